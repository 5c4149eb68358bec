//! The command line: a few switches (`--check`, `--probe`, ...) and, from
//! [`settings::SETTINGS`], one flag and one `MESHGATE_*` variable per setting of the config
//! file; a flag beats the variable, which beats the file.

use std::path::PathBuf;

use clap::Parser;

use crate::settings;

const ABOUT: &str = "Routing mesh and reverse proxy for Docker and Docker Swarm nodes";

const LONG_ABOUT: &str = "\
meshgate routes HTTP(S) requests to your services by host name, following the routes you
describe in a routes file and the containers and Swarm services it discovers from Docker
(VIRTUAL_HOST, meshgate.* or traefik.* labels); it orders their certificates, answers
their names (mesh-dns) and serves published ports on every node (L4 mesh). Run one agent
per node.

With no routes file and no Docker engine it serves the bundled example: whoami.localhost is
routed to a built-in demo backend, so you can try it at once.";

const EXAMPLES: &str = "\
Examples:
  Try it (no Docker needed):
    meshgate --http-listen 127.0.0.1:8080
    curl -H 'Host: whoami.localhost' http://127.0.0.1:8080/

  Route the containers of this Docker engine (nginx-proxy style):
    meshgate --http-listen 0.0.0.0:80
    docker run -d -e VIRTUAL_HOST=app.example.com nginx

  HTTPS, with Let's Encrypt certificates for the routes that ask (LETSENCRYPT_HOST=...,
  meshgate.tls=acme); try --acme-directory letsencrypt-staging first:
    meshgate --tls-https-listen 0.0.0.0:443 --acme-email ops@example.com
    docker run -d -e VIRTUAL_HOST=app.example.com -e LETSENCRYPT_HOST=app.example.com nginx

  Every node of a Swarm (workers see the whole cluster through the managers' agents;
  one agent orders the certificates), from a manager:
    meshgate --new-cluster-secret | docker secret create meshgate_cluster -
    docker stack deploy -c helm-free-deploy/stack.yml meshgate

  Serve your own routes, reloaded when the file changes:
    meshgate --routes-file /etc/meshgate/routes.toml

  Everything from a config file, one setting overridden:
    MESHGATE_LOG_FORMAT=json meshgate --config /etc/meshgate/meshgate.toml

  Check a config and routes file without starting:
    meshgate --config meshgate.toml --check

Admin endpoints (default 127.0.0.1:9090): / (status page), /metrics, /healthz, /readyz,
/api/state. Every setting below is also a key of the config file and a MESHGATE_* variable
(docs/configuration.md lists them). Documentation: README.md and docs/.";

// Independent one-shot switches, not a state machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct Cli {
    /// Config file (TOML). Without it, built-in defaults apply.
    #[arg(short, long, env = "MESHGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve the bundled example (whoami.localhost to the built-in whoami backend), even if
    /// a routes file is configured.
    #[arg(long)]
    pub example: bool,

    /// Validate the config (and routes file) and exit: 0 if valid, 1 with the reason if not.
    #[arg(long)]
    pub check: bool,

    /// Print the effective configuration (file + environment + flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// GET this http:// URL, or /readyz on a unix:PATH admin socket, and exit 0 if it answers
    /// 200, else 1 (a health check for images without curl, e.g. `meshgate --probe
    /// http://127.0.0.1:9090/readyz` or `meshgate --probe unix:/tmp/meshgate-admin.sock`).
    #[arg(long, value_name = "URL")]
    pub probe: Option<String>,

    /// Print a new cluster secret (a certificate and key, PEM) and exit. Every agent of a
    /// Swarm gets the same one: `meshgate --new-cluster-secret | docker secret create meshgate_cluster -`
    #[arg(long)]
    pub new_cluster_secret: bool,
}

impl Cli {
    /// The command line: these switches and one flag per setting ([`settings::SETTINGS`]).
    #[must_use]
    pub fn command() -> clap::Command {
        <Self as clap::CommandFactory>::command().args(settings::args())
    }

    /// Parses `args` (old setting names already taken as the new ones), exiting with clap's
    /// message on a mistake; returns the switches and the settings given.
    #[must_use]
    pub fn parse_from(args: Vec<std::ffi::OsString>) -> (Self, Vec<settings::Given>) {
        let matches = Self::command().get_matches_from(args);
        let cli = <Self as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let given = settings::given(&matches);
        (cli, given)
    }
}
