//! Progress of the long stages: indicatif bars on a terminal, a plain line every few seconds
//! otherwise (build logs), nothing with `--quiet`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a non-terminal stderr gets a line.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    quiet: bool,
    tty: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// No output at all (library use, tests).
    pub fn silent() -> Progress {
        Progress {
            quiet: true,
            tty: false,
        }
    }

    pub fn bar(&self, stage: &str, len: u64) -> Bar {
        let pb = (!self.quiet && self.tty).then(|| {
            let pb = ProgressBar::new(len);
            // The template is a constant: a bad one would be a bug caught by any run.
            if let Ok(st) = ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
            ) {
                pb.set_style(st.progress_chars("=> "));
            }
            pb.set_prefix(stage.to_string());
            pb
        });
        Bar {
            pb,
            log: !self.quiet && !self.tty,
            stage: stage.to_string(),
            len,
            start: Instant::now(),
            last: None,
        }
    }
}

pub struct Bar {
    pb: Option<ProgressBar>,
    log: bool,
    stage: String,
    len: u64,
    start: Instant,
    last: Option<Instant>,
}

impl Bar {
    /// Moves to `pos` with a status message (built only when it will be shown).
    pub fn set(&mut self, pos: u64, msg: impl FnOnce() -> String) {
        if let Some(pb) = &self.pb {
            pb.set_position(pos);
            pb.set_message(msg());
        } else if self.log && self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last = Some(Instant::now());
            eprintln!(
                "{}: {pos}/{} ({:.0} s) {}",
                self.stage,
                self.len,
                self.start.elapsed().as_secs_f64(),
                msg()
            );
        }
    }

    pub fn finish(self, msg: String) {
        if let Some(pb) = &self.pb {
            pb.finish_with_message(msg);
        } else if self.log {
            eprintln!(
                "{}: done in {:.1} s {msg}",
                self.stage,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
