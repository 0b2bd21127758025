//! `penny keys`: admin commands against a running keys service.

use anyhow::Context as _;
use penny_proto::keys::v1 as pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Where the service is and who is asking.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The keys service (`host:port`); `penny dev` writes it to dev.env.
    #[arg(long, env = "PENNY_KEYS_ADDR", default_value = "127.0.0.1:50052")]
    addr: String,
    /// A platform admin's bearer token; `penny dev` writes one to dev.env.
    #[arg(long = "token-env", default_value = "PENNY_TOKEN", hide = true)]
    token_env: String,
    /// PEM CA bundle: speak TLS to the service and trust certificates it signed.
    #[arg(long, env = "PENNY_CLIENT_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the server's certificate is for (default: the host of --addr).
    #[arg(long, env = "PENNY_CLIENT_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// PEM client certificate, for servers that require mTLS.
    #[arg(long, env = "PENNY_CLIENT_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "PENNY_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// `penny keys …`
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Show a tenant's key: versions, minimums, backend.
    Info {
        #[command(flatten)]
        target: Target,
        /// The tenant's id.
        #[arg(long)]
        tenant: String,
    },
    /// Add a key version; new encryptions use it, old ciphertexts still decrypt.
    Rotate {
        #[command(flatten)]
        target: Target,
        /// The tenant's id.
        #[arg(long)]
        tenant: String,
    },
    /// Change the minimum decryption version or whether the key may be deleted.
    Config {
        #[command(flatten)]
        target: Target,
        /// The tenant's id.
        #[arg(long)]
        tenant: String,
        /// Versions below this stop decrypting.
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// Allow (or forbid) deleting the key.
        #[arg(long)]
        deletion_allowed: Option<bool>,
    },
}

fn authorized<T>(message: T, token_env: &str) -> anyhow::Result<tonic::Request<T>> {
    let token = std::env::var(token_env).with_context(|| {
        format!("{token_env} is not set: source the dev.env that `penny dev` wrote")
    })?;
    penny_platform::principal::bearer_request(message, &token)
        .map_err(|_| anyhow::anyhow!("{token_env} does not hold a valid token"))
}

async fn client(target: &Target) -> anyhow::Result<KeyServiceClient<tonic::transport::Channel>> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let endpoint = match &target.tls_ca {
        None => Endpoint::from_shared(format!("http://{}", target.addr))?,
        Some(ca) => {
            let host = target
                .addr
                .rsplit_once(':')
                .map_or(target.addr.as_str(), |(h, _)| h);
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .domain_name(target.tls_domain.clone().unwrap_or_else(|| host.to_owned()));
            if let (Some(cert), Some(key)) = (&target.tls_cert, &target.tls_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            Endpoint::from_shared(format!("https://{}", target.addr))?
                .tls_config(tls)
                .context("client TLS configuration")?
        }
    };
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the keys service at {}", target.addr))?;
    Ok(KeyServiceClient::new(channel))
}

fn print_key(key: Option<pb::Key>) {
    let Some(key) = key else {
        println!("(no key in the reply)");
        return;
    };
    let backend = pb::KeyBackend::try_from(key.backend)
        .map(|b| {
            b.as_str_name()
                .trim_start_matches("KEY_BACKEND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    println!("key               {}", key.name);
    println!("tenant            {}", key.tenant_id);
    println!("backend           {backend}");
    println!("latest version    {}", key.latest_version);
    println!("min decryption    {}", key.min_decryption_version);
    println!("deletion allowed  {}", key.deletion_allowed);
    for version in key.versions {
        let created = version
            .create_time
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        println!("  v{:<4} created {created}", version.version);
    }
}

pub async fn run(command: KeysCommand) -> anyhow::Result<()> {
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    match command {
        KeysCommand::Info { target, tenant } => {
            let reply = client(&target)
                .await?
                .get_key(authorized(
                    pb::GetKeyRequest { tenant_id: tenant },
                    &target.token_env,
                )?)
                .await
                .map_err(status)?;
            print_key(reply.into_inner().key);
        }
        KeysCommand::Rotate { target, tenant } => {
            let reply = client(&target)
                .await?
                .rotate_key(authorized(
                    pb::RotateKeyRequest { tenant_id: tenant },
                    &target.token_env,
                )?)
                .await
                .map_err(status)?;
            print_key(reply.into_inner().key);
        }
        KeysCommand::Config {
            target,
            tenant,
            min_decryption_version,
            deletion_allowed,
        } => {
            let reply = client(&target)
                .await?
                .update_key_config(authorized(
                    pb::UpdateKeyConfigRequest {
                        tenant_id: tenant,
                        min_decryption_version,
                        deletion_allowed,
                    },
                    &target.token_env,
                )?)
                .await
                .map_err(status)?;
            print_key(reply.into_inner().key);
        }
    }
    Ok(())
}
