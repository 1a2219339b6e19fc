//! The `pathprobe-agent` command.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use pathprobe_agent::decode::{self, Direction};
use pathprobe_agent::{hexbytes, keyfile};

/// pathprobe agent: measures network paths (ExpressRoute, VPN, ...) with STAMP probes.
#[derive(Debug, Parser)]
#[command(name = "pathprobe-agent", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decode a STAMP test packet (the UDP payload, in hex) field by field.
    ///
    /// Paste the payload from a capture (Wireshark: Copy > as Hex Stream; tcpdump -X) to see
    /// what a sender or reflector, ours or a router's, put in each field.
    Decode(DecodeArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DirectionArg {
    /// Session-Sender to Session-Reflector (to port 862).
    Request,
    /// Session-Reflector to Session-Sender (from port 862).
    Reply,
}

#[derive(Debug, clap::Args)]
struct DecodeArgs {
    /// Which side sent the packet.
    #[arg(long, value_enum, env = "PATHPROBE_DIRECTION")]
    direction: DirectionArg,
    /// Read the 112-octet authenticated layout (implied by --auth-key-file).
    #[arg(long)]
    authenticated: bool,
    /// Check the HMAC with the key in this file (hexadecimal digits).
    #[arg(long, env = "PATHPROBE_AUTH_KEY_FILE")]
    auth_key_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The payload in hexadecimal; spaces and colons are ignored. Omit or give `-` to read
    /// standard input.
    hex: Option<String>,
}

fn run_decode(args: &DecodeArgs) -> anyhow::Result<ExitCode> {
    let text = match args.hex.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the packet from standard input")?;
            s
        }
        Some(h) => h.to_owned(),
    };
    let bytes = hexbytes::parse(&text).context("the packet is not valid hexadecimal")?;
    let key = args
        .auth_key_file
        .as_deref()
        .map(keyfile::load)
        .transpose()?;
    let direction = match args.direction {
        DirectionArg::Request => Direction::Request,
        DirectionArg::Reply => Direction::Reply,
    };
    let d = decode::decode(&bytes, direction, args.authenticated, key.as_ref())
        .context("cannot decode the packet")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", decode::render(&d));
    }
    let failed = d.hmac.as_deref().is_some_and(|h| h.starts_with("FAILED"));
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Decode(args) => run_decode(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pathprobe-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
