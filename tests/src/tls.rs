//! Test certificates: a CA, a server certificate for `localhost`, a client certificate.

use penny_platform::server::TlsMaterial;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// PEM material for a TLS test.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate (trusted by both sides).
    pub ca_pem: String,
    /// The server certificate, for `localhost`.
    pub server_cert_pem: String,
    /// Its key.
    pub server_key_pem: String,
    /// A client certificate signed by the CA.
    pub client_cert_pem: String,
    /// Its key.
    pub client_key_pem: String,
    /// A client certificate signed by another CA.
    pub rogue_client_cert_pem: String,
    /// Its key.
    pub rogue_client_key_pem: String,
}

fn ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("ca key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("ca cert");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(name: &str, issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let params = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
    let cert = params.signed_by(&key, issuer).expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Fresh certificates.
    pub fn generate() -> Self {
        let (ca_pem, issuer) = ca();
        let (server_cert_pem, server_key_pem) = leaf("localhost", &issuer);
        let (client_cert_pem, client_key_pem) = leaf("svc-test", &issuer);
        let (_, rogue_issuer) = ca();
        let (rogue_client_cert_pem, rogue_client_key_pem) = leaf("svc-rogue", &rogue_issuer);
        Self {
            ca_pem,
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            rogue_client_cert_pem,
            rogue_client_key_pem,
        }
    }

    /// Server material requiring client certificates from the CA (mTLS).
    pub fn server_mtls(&self) -> TlsMaterial {
        TlsMaterial {
            cert_pem: self.server_cert_pem.clone().into_bytes(),
            key_pem: self.server_key_pem.clone().into_bytes(),
            client_ca_pem: Some(self.ca_pem.clone().into_bytes()),
        }
    }
}
