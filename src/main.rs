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
        Command::Serve { config: path } => {
            let config = Config::load(&path)?;
            runtime(config.runtime.worker_threads)?.block_on(pgtenant::server::run(config, &path))
        }
        Command::Demo(args) => runtime(None)?.block_on(pgtenant::demo::run(args)),
        Command::Rls(cmd) => runtime(None)?.block_on(pgtenant::cli::rls(cmd)),
        Command::Audit(cmd) => runtime(None)?.block_on(pgtenant::cli::audit(cmd)),
        Command::Doctor(args) => {
            if runtime(None)?.block_on(pgtenant::cli::doctor(args))? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// One worker per core unless configured: more threads than cores only add context switches.
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n.max(1));
    }
    builder.enable_all().build()
}
