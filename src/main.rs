use clap::Parser;
use pgtenant::cli::{Cli, Command};
use pgtenant::config::Config;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGTENANT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Token(args) => pgtenant::cli::token(args),
        Command::CheckConfig { config } => pgtenant::cli::check_config(&config),
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(pgtenant::server::run(config))
        }
        Command::Demo(args) => runtime()?.block_on(pgtenant::demo::run(args)),
    }
}

/// One worker per core: on small machines extra threads only add context switches.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
