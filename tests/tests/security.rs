//! Bearer-token auth and TLS.

use std::process::Command;

use freshet_proto::v1::{ListFeatureViewsRequest, feature_service_client::FeatureServiceClient};
use freshet_tests::{fresh_database, reference_views, server, tempfile_dir};
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

    let mut right = tonic::Request::new(ListFeatureViewsRequest {});
    right.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(client.list_feature_views(right).await.unwrap().into_inner().views.len(), 2);

    // Probes carry no secret.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap(),
    );
    let answer = health.check(tonic_health::pb::HealthCheckRequest { service: "freshet.v1.FeatureService".into() }).await.unwrap();
    assert_eq!(answer.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}

#[tokio::test]
async fn serves_tls_with_a_configured_certificate() {
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
