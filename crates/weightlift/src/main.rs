//! The `weightlift` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(name = "weightlift", version, about = "Move freshly trained weights from RL trainers into inference engines")]
struct Cli {
    /// Log more: -v for one line per update, -vv for everything.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run updates end to end: receiver processes, a sender process, a synthetic model.
    Demo(commands::demo::DemoArgs),
    /// Plan the update of one engine rank and prove it covers every byte.
    Plan(commands::plan::PlanArgs),
    /// Hold a model in memory and take updates (an engine-side receiver).
    Serve(commands::serve::ServeArgs),
    /// Update running receivers.
    Push(commands::push::PushArgs),
    /// Measure host update throughput against memcpy.
    Bench(commands::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let result = match &cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Push(args) => commands::push::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
