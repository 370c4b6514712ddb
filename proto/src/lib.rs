//! The freshet.v1 gRPC contract: messages, client and server stubs generated
//! from `proto/freshet/v1/*.proto`, plus the encoded descriptor set that the
//! server hands to gRPC reflection so grpcurl needs no proto files.

pub mod v1 {
    tonic::include_proto!("freshet.v1");

    /// Encoded `FileDescriptorSet` of the freshet.v1 protos, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("freshet_descriptor");
}
