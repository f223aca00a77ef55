//! `thrust CMD ARGS...`: binds the proxy's listeners, starts the app server
//! as a child with `PORT=$TARGET_PORT`, proxies to it, relays signals, and
//! exits with the child's status.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use thruster_core::config::SETTINGS;
use thruster_core::server::DEFAULT_DRAIN;
use thruster_core::{log, Config, Server, ServerError, ServerOptions};

/// Every signal a Rack server acts on: stop (TERM, INT, QUIT), Puma's
/// phased restart (USR1), hot restart (USR2) and log reopening (HUP).
const RELAYED: [i32; 6] = [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2];

const USAGE: &str = "\
Usage: thrust CMD [ARGS...]

Runs CMD ARGS (your app server, e.g. `bin/rails server`) with PORT set to
TARGET_PORT and serves it through the thruster-rs proxy on HTTP_PORT (and
HTTPS_PORT with TLS: TLS_DOMAIN, TLS_CERTIFICATE_PATH or TLS_LOCAL).
Configuration comes from environment variables, which `thrust --help` lists.

  thrust --version   print the version
  thrust --help      print this help
";

/// `--help`: the usage, then every setting with its default (from the
/// settings table, like the documentation) and where the meanings are.
fn help() -> String {
    let width = SETTINGS.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut text = format!(
        "{USAGE}\nSettings and their defaults (THRUSTER_NAME wins over NAME; an empty value\n\
         counts as unset):\n\n"
    );
    for setting in SETTINGS {
        let default = setting.default_text();
        text.push_str(&format!("  {:width$}  {default}\n", setting.name));
    }
    text.push_str(&format!("\nWhat each one does: {}\n", reference()));
    text
}

/// The configuration reference: the copy shipped next to this binary (in
/// the gem, `lib/thruster/thrust` and `docs/`; in a checkout, also
/// `target/<profile>/thrust`), else its path in the gem.
fn reference() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let root = exe.parent()?.parent()?.parent()?;
            std::fs::canonicalize(root.join("docs/configuration.md")).ok()
        })
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "docs/configuration.md in the thruster-rs gem".to_string())
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.first().and_then(|a| a.to_str()) {
        None => {
            eprintln!("ERROR: missing upstream command\n\n{USAGE}");
            return ExitCode::from(1);
        }
        Some("--version") => {
            println!("thrust (thruster-rs) {}", thruster_core::VERSION);
            return ExitCode::SUCCESS;
        }
        Some("--help") => {
            print!("{}", help());
            return ExitCode::SUCCESS;
        }
        Some(_) => {}
    }

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("thrust: {err}");
            return ExitCode::from(2);
        }
    };
    let target_port = config.target_port;

    // Handlers go in before the child exists, so no signal sent in between is
    // lost; they are reset to default in the child by exec.
    let mut signals = match Signals::new(RELAYED) {
        Ok(signals) => signals,
        Err(err) => {
            log::error(
                "Failed to install signal handlers",
                &[("error", err.to_string().into())],
            );
            return ExitCode::from(1);
        }
    };

    let options = ServerOptions::for_wrapper(&config);
    let sendfile_token = options.sendfile_token.clone();
    // Binds HTTP_PORT and, in TLS mode, HTTPS_PORT before the child starts.
    let server = match Server::start(config, options) {
        Ok(server) => server,
        Err(ServerError::Tls(err)) => {
            eprintln!("thrust: {err}");
            return ExitCode::from(2);
        }
        Err(ServerError::SharedCache(err)) => {
            eprintln!("thrust: {err}");
            return ExitCode::from(2);
        }
        Err(err) => {
            let msg = match &err {
                ServerError::Bind {
                    listener: "HTTPS", ..
                } => "Failed to start HTTPS listener",
                _ => "Failed to start HTTP listener",
            };
            log::error(msg, &[("error", err.to_string().into())]);
            return ExitCode::from(1);
        }
    };

    let (program, rest) = (&args[0], &args[1..]);
    let mut command = Command::new(program);
    // The Puma plugin sees this and stands aside: one proxy per request.
    command
        .args(rest)
        .env("PORT", target_port.to_string())
        .env("THRUSTER_RS_WRAPPED", "1")
        // The app's Thruster::Sendfile middleware trusts requests carrying it.
        .env(
            thruster_core::pipeline::sendfile::TOKEN_ENV,
            &sendfile_token,
        )
        // Thruster.purge in the app calls the admin listener with these.
        .env(thruster_core::server::ADMIN_URL_ENV, server.admin_url())
        .env(thruster_core::server::ADMIN_TOKEN_ENV, server.admin_token());
    // If thrust itself is killed outright, the app server is told to stop
    // rather than left running without its proxy.
    // SAFETY: prctl is async-signal-safe and touches no shared state.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            log::error(
                "Failed to start wrapped process",
                &[
                    ("command", program.to_string_lossy().into_owned().into()),
                    (
                        "args",
                        rest.iter()
                            .map(|a| a.to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .into(),
                    ),
                    ("error", err.to_string().into()),
                ],
            );
            server.stop(DEFAULT_DRAIN);
            return ExitCode::from(1);
        }
    };

    let child_pid = Arc::new(AtomicI32::new(child.id() as i32));
    let child_running = Arc::new(AtomicBool::new(true));
    let handle = signals.handle();
    let server = Arc::new(server);
    let relay = {
        let (pid, running) = (child_pid.clone(), child_running.clone());
        let server = server.clone();
        std::thread::Builder::new()
            .name("thrust-signals".into())
            .spawn(move || {
                let mut drained = false;
                for signal in signals.forever() {
                    if !running.load(Ordering::SeqCst) {
                        break;
                    }
                    // Stop: first stop accepting and let every request the
                    // proxy holds be answered by the app, then tell the app.
                    // Relaying first would make the app close its listener
                    // under requests still on their way to it.
                    if (signal == SIGTERM || signal == SIGINT) && !drained {
                        drained = true;
                        log::info("Draining before stopping the upstream process", &[]);
                        if !server.drain(DEFAULT_DRAIN) {
                            log::info("Drain timed out; stopping anyway", &[]);
                        }
                    }
                    log::info(
                        "Relaying signal to upstream process",
                        &[("signal", signal_name(signal).into())],
                    );
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid.load(Ordering::SeqCst), signal) };
                }
            })
            .expect("spawning the signal relay thread")
    };

    let status = child.wait();
    child_running.store(false, Ordering::SeqCst);
    handle.close();
    let _ = relay.join();
    match Arc::try_unwrap(server) {
        Ok(server) => server.stop(DEFAULT_DRAIN),
        Err(server) => server.begin_shutdown(),
    }

    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(signal)) => ExitCode::from((128 + signal) as u8),
            (None, None) => ExitCode::from(1),
        },
        Err(err) => {
            log::error(
                "Failed to wait for wrapped process",
                &[("error", err.to_string().into())],
            );
            ExitCode::from(1)
        }
    }
}

/// Go's names for signals, as Thruster logs them.
fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "terminated",
        SIGINT => "interrupt",
        SIGQUIT => "quit",
        SIGHUP => "hangup",
        SIGUSR1 => "user defined signal 1",
        SIGUSR2 => "user defined signal 2",
        _ => "unknown",
    }
}
