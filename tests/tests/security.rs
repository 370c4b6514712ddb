//! Bearer-token auth, TLS, and requests a hostile or broken client sends.

use std::process::Command;

use freshet_proto::v1::{
    EntityKey, GetFeaturesRequest, GetFeaturesResponse, ListFeatureViewsRequest, entity_key::Key,
    feature_service_client::FeatureServiceClient,
};
use freshet_tests::{fresh_database, reference_views, server, server_refusal, tempfile_dir};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig},
};

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
    assert!(status.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&status.stderr));
}

#[tokio::test]
async fn calls_need_a_token_when_tokens_are_configured_but_health_does_not() {
    let dir = tempfile_dir::Dir::new();
    let tokens = dir.path.join("tokens");
    std::fs::write(&tokens, "# one per line\ns3cret\n").unwrap();
    let url = fresh_database().await;
    let (_server, address) = server(&reference_views(), &url, &["--tokens-file", tokens.to_str().unwrap()]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let status = client.list_feature_views(ListFeatureViewsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut wrong = tonic::Request::new(ListFeatureViewsRequest {});
    wrong.metadata_mut().insert("authorization", "Bearer guess".parse().unwrap());
    assert_eq!(client.list_feature_views(wrong).await.unwrap_err().code(), Code::Unauthenticated);

    for scheme in ["Bearer", "bearer", "BEARER"] {
        // RFC 7235: the scheme is case-insensitive.
        let mut right = tonic::Request::new(ListFeatureViewsRequest {});
        right.metadata_mut().insert("authorization", format!("{scheme} s3cret").parse().unwrap());
        assert_eq!(client.list_feature_views(right).await.unwrap().into_inner().views.len(), 2, "{scheme}");
    }
    let mut other_case = tonic::Request::new(ListFeatureViewsRequest {});
    other_case.metadata_mut().insert("authorization", "Bearer S3CRET".parse().unwrap());
    assert_eq!(client.list_feature_views(other_case).await.unwrap_err().code(), Code::Unauthenticated, "the token itself is exact");

    // Probes carry no secret.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap(),
    );
    let answer = health.check(tonic_health::pb::HealthCheckRequest { service: "freshet.v1.FeatureService".into() }).await.unwrap();
    assert_eq!(answer.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}

#[tokio::test]
async fn serves_tls_with_a_configured_certificate() {
    freshet_store::tls::install_crypto_provider();
    let dir = tempfile_dir::Dir::new();
    openssl(
        &dir.path,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=freshet-test-ca",
        ],
    );
    openssl(&dir.path, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    std::fs::write(dir.path.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(
        &dir.path,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext",
        ],
    );
    let url = fresh_database().await;
    let cert = dir.path.join("server.pem");
    let key = dir.path.join("server.key");
    let (_server, address) = server(&reference_views(), &url, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);

    let ca = std::fs::read(dir.path.join("ca.pem")).unwrap();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    let channel =
        Channel::from_shared(format!("https://localhost:{}", address.port())).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let views = FeatureServiceClient::new(channel).list_feature_views(ListFeatureViewsRequest {}).await.unwrap().into_inner();
    assert_eq!(views.views.len(), 2);

    // Plaintext is not served on a TLS port.
    let plain = FeatureServiceClient::connect(format!("http://{address}")).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c.list_feature_views(ListFeatureViewsRequest {}).await.is_err(),
    };
    assert!(refused);
}

#[tokio::test]
async fn a_tokens_file_without_tokens_refuses_to_start() {
    let dir = tempfile_dir::Dir::new();
    let url = fresh_database().await;
    for (name, text) in [("empty", ""), ("comments", "# tokens go here, one per line\n\n   \n")] {
        let tokens = dir.path.join(name);
        std::fs::write(&tokens, text).unwrap();
        let said = server_refusal(&reference_views(), &url, &["--tokens-file", tokens.to_str().unwrap()]);
        assert!(said.contains("holds no token") && said.contains(tokens.to_str().unwrap()), "{said}");
    }
}

/// GetFeaturesRequest as raw bytes on the wire: lets a test send strings
/// that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(bytes = "vec", repeated, tag = "1")]
    features: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    entities: Vec<EntityKey>,
}

async fn send_raw(address: std::net::SocketAddr, request: RawRequest) -> Result<GetFeaturesResponse, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/freshet.v1.FeatureService/GetFeatures");
    grpc.unary(tonic::Request::new(request), path, tonic_prost::ProstCodec::default()).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_as_the_clients_fault() {
    let url = fresh_database().await;
    let (_server, address) = server(&reference_views(), &url, &["--max-request-bytes", "65536"]);
    let one = vec![EntityKey { key: Some(Key::Int64Key(1)) }];

    let not_utf8 = RawRequest { features: vec![b"orders:spend_1h".to_vec(), vec![b'o', 0xff, 0xfe, b':', b'x']], entities: one.clone() };
    let status = send_raw(address, not_utf8).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("GetFeaturesRequest.features"), "names the field: {}", status.message());

    let oversized = RawRequest { features: vec![vec![b'a'; 70_000]], entities: one.clone() };
    let status = send_raw(address, oversized).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Under the size limit but unknown: the answer quotes a short prefix,
    // not 60 KB of what was sent.
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let long = format!("{}:{}", "v".repeat(30_000), "é".repeat(15_000));
    let status = client.get_features(GetFeaturesRequest { features: vec![long.clone()], entities: one, max_age: None }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("features[0]: unknown feature view \"vvvv"), "{}", status.message());
    assert!(status.message().len() < 200, "{} bytes echoed back", status.message().len());
    // Still serving.
    assert_eq!(client.list_feature_views(ListFeatureViewsRequest {}).await.unwrap().into_inner().views.len(), 2);
}
