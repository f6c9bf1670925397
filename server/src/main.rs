//! The `logitd` binary. The serving commands (`serve`, `info`, `sample`) are
//! built on the library in `logitd::`; see the README for their status.

fn main() -> std::process::ExitCode {
    let version = env!("CARGO_PKG_VERSION");
    match std::env::args().nth(1).as_deref() {
        Some("--version" | "-V") => {
            println!("logitd {version}");
            std::process::ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "logitd {version}\n\nThis build has the sampling library only; the serve, info and \
                 sample commands are not built yet (see README.md, \"Status\")."
            );
            std::process::ExitCode::from(2)
        }
    }
}
