//! Where a command's reports go besides the terminal: a collector, through an on-disk
//! spool, so that reports a collector could not take wait for the next run.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pathprobe_agent::delivery::{self, Courier, Destination};
use pathprobe_proto::report::WindowReport;

/// Writes the report `build` makes into `dir` (as `REPORT_ID.json`) and queues it in
/// `outbox`, for those that are given; `build` runs only if one is.
pub fn keep_report(
    dir: Option<&Path>,
    outbox: Option<&mut Outbox>,
    build: impl FnOnce() -> anyhow::Result<WindowReport>,
) -> anyhow::Result<()> {
    if dir.is_none() && outbox.is_none() {
        return Ok(());
    }
    let r = build()?;
    let json = r.to_json()?;
    if let Some(dir) = dir {
        let file = dir.join(format!("{}.json", r.report_id));
        std::fs::write(&file, &json).with_context(|| format!("cannot write {}", file.display()))?;
    }
    if let Some(o) = outbox {
        o.push(&json);
    }
    Ok(())
}

/// `--collector`, `--token-file` and `--spool`.
#[derive(Debug, clap::Args)]
pub struct CollectorArgs {
    /// Send each report to this collector (like <http://10.0.0.5:8862>).
    #[arg(long, env = "PATHPROBE_COLLECTOR")]
    pub collector: Option<String>,
    /// The agent's collector token, in this file.
    #[arg(long, requires = "collector", env = "PATHPROBE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where reports wait until the collector has them [default: pathprobe-COMMAND-spool
    /// in the temp folder]; a later run with the same --spool delivers what an earlier one
    /// could not.
    #[arg(long, requires = "collector", env = "PATHPROBE_SPOOL")]
    pub spool: Option<PathBuf>,
    /// The CA (PEM) that signed an https:// collector's certificate [default: the
    /// system's CAs].
    #[arg(long, requires = "collector", env = "PATHPROBE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// This agent's client certificate (PEM), for a collector that requires mutual TLS.
    #[arg(long, requires_all = ["collector", "client_key"], env = "PATHPROBE_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM; mode 0600).
    #[arg(long, requires = "client_cert", env = "PATHPROBE_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Allow an http:// collector beyond loopback: reports and token in clear.
    #[arg(long, requires = "collector", env = "PATHPROBE_INSECURE_HTTP")]
    pub insecure_http: bool,
}

/// Reports on their way to a collector: the agent's one delivery path
/// ([`pathprobe_agent::delivery`]), drained once the command has its results.
pub struct Outbox {
    courier: Courier,
    url: String,
}

impl CollectorArgs {
    /// The outbox of `command`'s reports, when a collector is given.
    pub fn outbox(&self, command: &str) -> anyhow::Result<Option<Outbox>> {
        let Some(url) = &self.collector else {
            return Ok(None);
        };
        if delivery::cleartext_beyond_loopback(url) && !self.insecure_http {
            anyhow::bail!(
                "--collector {url} would send reports and the agent's token in clear beyond this host: use https:// (the collector's --tls-cert), or add --insecure-http on a network you trust"
            );
        }
        if self.insecure_http && delivery::cleartext_beyond_loopback(url) {
            tracing::warn!(collector = %url, "reports and the agent's token travel in clear (--insecure-http)");
        }
        let to = Destination {
            url: url.clone(),
            token: delivery::read_token(None, self.token_file.as_deref(), "--token-file")?,
            spool_dir: self
                .spool
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join(format!("pathprobe-{command}-spool"))),
            spool_max: 100_000,
            tls: delivery::TlsClient {
                ca_file: self.ca_file.clone(),
                client_cert: self.client_cert.clone(),
                client_key: self.client_key.clone(),
            },
            insecure_http: self.insecure_http,
        };
        Ok(Some(Outbox {
            courier: Courier::open(&to)?,
            url: url.clone(),
        }))
    }
}

impl Outbox {
    /// Queues one report (JSON), durably; if the spool cannot be written, it is held in
    /// memory and delivered from there.
    pub fn push(&mut self, json: &[u8]) {
        self.courier.push(json);
    }

    /// Sends every queued report, in batches; `what` names them in messages.
    pub fn deliver(&mut self, what: &str) -> anyhow::Result<()> {
        if let Err(u) = self.courier.drain() {
            anyhow::bail!(
                "the collector at {} did not take the {what}s ({}): {} wait in {}; run again with --spool {} to deliver them",
                self.url,
                u.why,
                u.left,
                u.dir.display(),
                u.dir.display()
            );
        }
        tracing::info!(collector = %self.url, "{what}s delivered");
        Ok(())
    }
}
