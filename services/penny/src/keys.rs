//! `penny keys`: admin commands against a running keys service.

use anyhow::Context as _;
use penny_proto::keys::v1 as pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use tonic::transport::Endpoint;

/// Where the service is and who is asking.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The keys service (`host:port`); `penny dev` writes it to dev.env.
    #[arg(long, env = "PENNY_KEYS_ADDR", default_value = "127.0.0.1:50052")]
    addr: String,
    /// A platform admin's bearer token; `penny dev` writes one to dev.env.
    #[arg(long = "token-env", default_value = "PENNY_TOKEN", hide = true)]
    token_env: String,
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
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the token is not a valid header value")?,
    );
    Ok(request)
}

async fn client(target: &Target) -> anyhow::Result<KeyServiceClient<tonic::transport::Channel>> {
    let channel = Endpoint::from_shared(format!("http://{}", target.addr))?
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
