//! SIGINT and SIGTERM: a compile stopped by a signal removes what it had half-written (its
//! private temporary directories), stops the child processes it started, says so in one line
//! and exits with 128 + the signal's number (130, 143), as shells expect.
//!
//! The final outputs appear by renames done while [`publishing`] is held, and the handler
//! takes the same lock: a signal lands either before the first rename (nothing of the compile
//! is left) or after the last one (all of it is).

use std::path::{Path, PathBuf};
use std::process::Child;
#[cfg(doc)]
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::Error;

#[derive(Default)]
struct State {
    dirs: Vec<PathBuf>,
    children: Vec<u32>,
}

static STATE: Mutex<State> = Mutex::new(State {
    dirs: Vec::new(),
    children: Vec::new(),
});

fn state() -> MutexGuard<'static, State> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the thread that handles SIGINT and SIGTERM for the program `tool`.
pub fn install(tool: &'static str) -> Result<(), Error> {
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Error::Internal(format!("installing the signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let st = state();
                for &pid in &st.children {
                    stop_group(pid);
                }
                for d in &st.dirs {
                    let _ = std::fs::remove_dir_all(d);
                }
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                eprintln!("{tool}: interrupted by {name}; no output was written");
                std::process::exit(128 + sig);
            }
        })
        .map_err(|e| Error::Internal(format!("starting the signal thread: {e}")))?;
    Ok(())
}

/// Stops the process group `pid` leads (a child started with [`Command::process_group`]`(0)`,
/// so the compilers a cargo started stop too) and waits up to 5 s for it to be gone, so that
/// nothing writes into a directory after it is removed.
fn stop_group(pid: u32) {
    let g = -(pid as libc::pid_t);
    // SAFETY: kill(2) on the group of a child this process started and still waits for.
    unsafe { libc::kill(g, libc::SIGTERM) };
    for _ in 0..500 {
        // SAFETY: as above; signal 0 only asks whether the group still has members.
        if unsafe { libc::kill(g, 0) } != 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A temporary directory removed if a signal stops the program while this lives.
pub struct DirGuard(PathBuf);

impl DirGuard {
    pub fn new(dir: &Path) -> DirGuard {
        state().dirs.push(dir.to_path_buf());
        DirGuard(dir.to_path_buf())
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        state().dirs.retain(|d| d != &self.0);
    }
}

/// Waits for `child` like `Child::wait_with_output`, stopping it if a signal stops the program.
/// Start it in a process group of its own (`process_group(0)`).
pub fn wait(child: Child) -> std::io::Result<std::process::Output> {
    let pid = child.id();
    state().children.push(pid);
    let out = child.wait_with_output();
    state().children.retain(|&p| p != pid);
    out
}

/// Held while the final outputs are renamed into place: a signal waits for it.
pub fn publishing() -> MutexGuard<'static, impl Sized> {
    state()
}
