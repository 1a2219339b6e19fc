//! The `pathprobe-collector` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pathprobe_collector::{Error, inspect};
use pathprobe_proto::report::WindowReport;

/// pathprobe collector: merges agents' window reports and compares paths.
#[derive(Debug, Parser)]
#[command(name = "pathprobe-collector", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate window report files and print each path's windows merged exactly.
    Inspect {
        /// Report files (JSON, one report each); `-` reads one from standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Error> {
    let result = if path.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).map(|_| v)
    } else {
        std::fs::read(path)
    };
    result.map_err(|source| Error::ReadFile {
        path: path.clone(),
        source,
    })
}

fn run_inspect(files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let mut reports = Vec::with_capacity(files.len());
    for f in files {
        let bytes = read(f)?;
        let report = WindowReport::from_json(&bytes).map_err(|source| Error::Report {
            origin: f.display().to_string(),
            source,
        })?;
        reports.push((f.display().to_string(), report));
    }
    let summaries = inspect::summarize(reports.iter().map(|(o, r)| (o.as_str(), r)))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summaries).context("cannot write JSON")?
        );
    } else {
        println!("{}", inspect::render(&summaries));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect { files, json } => run_inspect(files, *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pathprobe-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
