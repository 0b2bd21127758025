//! `penny`: the one executable of the fleet.
//!
//! `penny dev` runs every implemented service in one process on embedded defaults,
//! `penny serve <svc>` runs one service (what containers run), `penny bench` is the load
//! tool every performance target is measured with, `penny keys` holds admin commands.

#![forbid(unsafe_code)]

mod audit;
mod bench;
mod bench_audit;
mod bench_files;
mod dev;
mod keys;
mod serve;

use clap::{Parser, Subcommand};

/// Penny: the security backbone of a multi-tenant AI chat platform.
#[derive(Debug, Parser)]
#[command(name = "penny", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every implemented service in one process on embedded defaults.
    Dev(dev::DevArgs),
    /// Run one service, as a container does.
    Serve {
        #[command(subcommand)]
        service: Box<serve::ServeCommand>,
    },
    /// Drive load at a server and report throughput and latency.
    Bench(bench::BenchArgs),
    /// The audit trail's offline tools: checkpoint keys and verifying an export.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Key-management admin commands against a running keys service.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
}

fn main() -> std::process::ExitCode {
    penny_platform::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("penny: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Serve { service } => serve::run(*service).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Audit { command } => audit::run(command),
            Command::Keys { command } => keys::run(command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("penny: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
