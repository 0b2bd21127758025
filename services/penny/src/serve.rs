//! `penny serve <svc>`: one service, as containers run it.

use penny_platform::config::ServerArgs;
use penny_platform::telemetry;

/// The service to run.
#[derive(Debug, clap::Subcommand)]
pub enum ServeCommand {
    /// Authentication (`penny.auth.v1.AuthService`). Needs the tenants service and,
    /// through the standard settings, the authz service.
    Auth {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        auth: penny_auth::Args,
    },
    /// Key management (`penny.keys.v1.KeyService`).
    Keys {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        keys: penny_keys::Args,
    },
    /// Authorization (`penny.authz.v1.AuthzService`).
    Authz {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        authz: penny_authz::Args,
    },
    /// The audit trail (`penny.audit.v1.AuditService`).
    Audit {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        audit: penny_audit::Args,
    },
    /// Tenants, users and workspaces (`penny.tenants.v1.TenantService`). Needs the keys
    /// service and, through the standard settings, the authz service.
    Tenants {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        tenants: penny_tenants::Args,
    },
    /// Files (`penny.files.v1.FileService`): uploads scanned by clamd and sealed under
    /// keys from the keys service. Needs keys, clamd and, through the standard settings,
    /// the authz service.
    Files {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        files: penny_files::Args,
    },
}

pub async fn run(command: ServeCommand) -> anyhow::Result<()> {
    match command {
        ServeCommand::Auth { server, auth } => {
            let _telemetry = telemetry::init(server.log_format, "penny-auth")?;
            let serve_config = server.serve_config()?;
            let listen = auth.listen;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_AUTH_LISTEN {listen}: {e}"))?;
            let http_listen = auth.http_listen;
            let http_listener = tokio::net::TcpListener::bind(http_listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_AUTH_HTTP_LISTEN {http_listen}: {e}"))?;
            penny_auth::serve(
                auth.into_config()?,
                serve_config,
                listener,
                Some(http_listener),
                penny_platform::shutdown_signal(),
            )
            .await
        }
        ServeCommand::Keys { server, keys } => {
            let _telemetry = telemetry::init(server.log_format, "penny-keys")?;
            let serve_config = server.serve_config()?;
            let listen = keys.listen;
            let config = keys.into_config()?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_KEYS_LISTEN {listen}: {e}"))?;
            penny_keys::serve(
                config,
                serve_config,
                listener,
                penny_platform::shutdown_signal(),
            )
            .await
        }
        ServeCommand::Authz { server, authz } => {
            let _telemetry = telemetry::init(server.log_format, "penny-authz")?;
            let serve_config = server.serve_config()?;
            let listen = authz.listen;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_AUTHZ_LISTEN {listen}: {e}"))?;
            penny_authz::serve(
                authz.into_config(),
                serve_config,
                listener,
                penny_platform::shutdown_signal(),
            )
            .await
        }
        ServeCommand::Audit { server, audit } => {
            let _telemetry = telemetry::init(server.log_format, "penny-audit")?;
            let serve_config = server.serve_config()?;
            let listen = audit.listen;
            let config = audit.into_config()?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_AUDIT_LISTEN {listen}: {e}"))?;
            penny_audit::serve(
                config,
                serve_config,
                listener,
                penny_platform::shutdown_signal(),
            )
            .await
        }
        ServeCommand::Tenants { server, tenants } => {
            let _telemetry = telemetry::init(server.log_format, "penny-tenants")?;
            let serve_config = server.serve_config()?;
            let listen = tenants.listen;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_TENANTS_LISTEN {listen}: {e}"))?;
            penny_tenants::serve(
                tenants.into_config(),
                serve_config,
                listener,
                penny_platform::shutdown_signal(),
            )
            .await
        }
        ServeCommand::Files { server, files } => {
            let _telemetry = telemetry::init(server.log_format, "penny-files")?;
            let serve_config = server.serve_config()?;
            let (listen, http_listen) = (files.listen, files.http_listen);
            let config = files.into_config()?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_FILES_LISTEN {listen}: {e}"))?;
            let http_listener = tokio::net::TcpListener::bind(http_listen)
                .await
                .map_err(|e| anyhow::anyhow!("PENNY_FILES_HTTP_LISTEN {http_listen}: {e}"))?;
            penny_files::serve(
                config,
                serve_config,
                listener,
                http_listener,
                penny_platform::shutdown_signal(),
            )
            .await
        }
    }
}
