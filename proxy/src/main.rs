//! The `meshgate` binary: parse flags and config, start logging, run the agent until a
//! signal, drain. All logic lives in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use meshgate::agent::{self, Sources};
use meshgate::cli::Cli;
use meshgate::config::{Config, LogFormat};
use meshgate::provider::file;
use meshgate::settings::Given;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    forget_empty_settings();
    let (args, warnings) = meshgate::settings::accept_old_names(std::env::args_os().collect());
    let (cli, given) = Cli::parse_from(args);
    if cli.new_cluster_secret {
        return match meshgate::cluster::identity::generate() {
            Ok(pem) => {
                print!("{pem}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshgate: cannot make a cluster secret: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(url) = &cli.probe {
        return match probe(url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshgate: probe {url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli, &given, &warnings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshgate: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once (an error that names its cause in its own text
/// is not followed by the cause again).
fn message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out = format!("{out}: {cause}");
        }
    }
    out
}

/// An empty `MESHGATE_*` variable means "not set", as a stack file's `${NAME:-}` passes
/// an optional setting the user left out. Runs before any other thread exists.
fn forget_empty_settings() {
    for (name, value) in std::env::vars_os() {
        if value.is_empty() && name.to_str().is_some_and(|n| n.starts_with("MESHGATE_")) {
            std::env::remove_var(name);
        }
    }
}

fn load_config(cli: &Cli, given: &[Given]) -> anyhow::Result<(Config, bool, bool, bool)> {
    let file = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let config = meshgate::settings::apply(&file, given)?;
    config.validate()?;
    Ok((config, cli.example, cli.check, cli.print_config))
}

fn init_logging(config: &Config) {
    // hickory logs every DNS query at info: keep it to warnings unless asked for.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("hickory_server=warn,{}", config.log.level)));
    // Colours only on a terminal: not into files, journald or `docker logs`.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Which providers run, and why, in one line for the log.
fn choose_sources(config: &Config, example: bool) -> (Sources, String) {
    if example {
        return (Sources::example(), "serving the bundled example (asked for with --example)".into());
    }
    let docker = config.docker.wanted();
    let file = config.routes.file.clone();
    let mut parts = Vec::new();
    if let Some(path) = &file {
        parts.push(format!("routes file {}", path.display()));
    }
    if docker.is_ok() {
        parts.push(format!("Docker discovery on {}", config.docker.endpoint()));
    }
    let follows = matches!(config.cluster.role, meshgate::cluster::RoleSetting::Worker);
    if follows {
        parts.push(format!("the cluster feed of {}", config.cluster.peers.join(", ")));
    }
    match (file.is_some() || follows, docker) {
        (false, Err(why)) => (
            Sources::example(),
            format!(
                "no routes file given and {why}: serving the bundled example, whoami.localhost -> built-in whoami on {}",
                config.whoami.listen.map_or_else(|| agent::EXAMPLE_WHOAMI.to_owned(), |a| a.to_string())
            ),
        ),
        (_, docker) => (Sources { file, docker: docker.is_ok(), example: false }, format!("serving {}", parts.join(" and "))),
    }
}

fn run(cli: &Cli, given: &[Given], warnings: &[String]) -> anyhow::Result<()> {
    let (config, example, check, print_config) = load_config(cli, given)?;
    if print_config || check {
        for warning in warnings {
            eprintln!("meshgate: {warning}");
        }
    }
    if print_config {
        print!("{}", toml::to_string_pretty(&config).context("cannot print the config")?);
        return Ok(());
    }
    if check {
        if let Some(path) = &config.routes.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read routes file {}", path.display()))?;
            let state = file::parse(path, &text, file::NAME)?;
            println!("config ok; routes file ok: {} services", state.services.len());
        } else {
            println!("config ok");
        }
        return Ok(());
    }
    init_logging(&config);
    // Every TLS config of meshgate names its provider; this default is for the Docker client's
    // (an engine over TLS): two providers are compiled in, so rustls has none of its own.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let (sources, why) = choose_sources(&config, example);
    tracing::info!("{why}");

    let runtime = runtime().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Handlers first: a SIGHUP during start must not kill the process either.
        let signals = Signals::install();
        let agent = agent::start(config, sources).await?;
        signals.wait_for_stop(&agent).await;
        agent.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// The async runtime: one worker per core (`TOKIO_WORKER_THREADS` sets another count), and
/// with one worker the current-thread scheduler, which skips the work-stealing machinery
/// (4% more proxied requests/s on one pinned core, `bench/RESULTS.md`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

/// The signals the agent answers: SIGTERM and SIGINT stop it, SIGHUP reloads what can be
/// reloaded and goes on (an operator's `kill -HUP` must never stop the proxy).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind: SignalKind| signal(kind).expect("installing a signal handler");
        Self {
            term: handler(SignalKind::terminate()),
            int: handler(SignalKind::interrupt()),
            hup: handler(SignalKind::hangup()),
            usr1: handler(SignalKind::user_defined1()),
        }
    }

    async fn wait_for_stop(mut self, agent: &agent::RunningAgent) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => agent.reload(),
                // logrotate's habit: reopen the access log's file; the agent is not stopped.
                _ = self.usr1.recv() => agent.reopen_logs(),
            }
        }
    }
}

/// A minimal blocking HTTP/1.0 GET: enough for a container health check.
fn probe(url: &str) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(3);
    let (mut stream, authority, path): (Box<dyn ReadWrite>, &str, String) = if let Some(socket) =
        url.strip_prefix("unix:")
    {
        let stream = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("cannot connect to {socket}"))?;
        stream.set_read_timeout(Some(timeout))?;
        (Box::new(stream), "localhost", "/readyz".to_owned())
    } else {
        let rest =
            url.strip_prefix("http://").context("only http:// URLs and unix:PATH sockets can be probed")?;
        let (authority, path) =
            rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
        let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
            .next()
            .context("the address does not resolve")?;
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        (Box::new(stream), authority, path)
    };
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.") && &head[9..12] == b"200",
        "answered {}",
        String::from_utf8_lossy(&head)
    );
    Ok(())
}

/// A byte stream the probe can use: TCP or a Unix socket.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}
