//! Helpers for tests that start real processes: a unique runtime directory per test, children
//! that are always killed and reaped, and line-by-line reading of a child's output with a
//! timeout (so tests wait for what a process says, never for a fixed time).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

/// The `memplane` binary under test.
pub fn memplane() -> &'static str {
    env!("CARGO_BIN_EXE_memplane")
}

/// A fresh, empty runtime directory, removed on drop. Short, so socket paths fit.
pub struct TestDir(PathBuf);

impl TestDir {
    /// Creates `/tmp/mpt-<pid>-<n>`.
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(format!(
            "/tmp/mpt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TestDir(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a string, for command lines.
    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose stdout is read line by line; killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    name: String,
}

impl Proc {
    /// Starts `memplane` with `args`.
    pub fn memplane(args: &[&str]) -> Proc {
        Proc::spawn(Command::new(memplane()).args(args), &args.join(" "))
    }

    /// Starts `cmd` with stdout piped.
    pub fn spawn(cmd: &mut Command, name: &str) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
            name: name.to_owned(),
        }
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `limit`) for a line containing `needle`; returns it.
    pub fn expect_line(&mut self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line with {needle:?} within {limit:?}; saw {:#?}",
                    self.name, self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited before printing {needle:?}; saw {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit (at most `limit`), collecting the rest of its output.
    pub fn finish(&mut self, limit: Duration) -> (i32, Vec<String>) {
        let end = Instant::now() + limit;
        loop {
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(l) => self.seen.push(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: did not exit within {limit:?}; saw {:#?}",
                        self.name, self.seen
                    )
                }
            }
        }
        let st = self.child.wait().expect("wait");
        (st.code().unwrap_or(-1), self.seen.clone())
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped) and a valid signal.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Number of open fds of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `memplane` with `args` to completion; returns (exit code, stdout lines, stderr).
pub fn run(args: &[&str]) -> (i32, Vec<String>, String) {
    let out = Command::new(memplane())
        .args(args)
        .output()
        .expect("run memplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `memplane primary` in `dir` and waits until it is ready.
pub fn primary(dir: &TestDir) -> Proc {
    let mut p = Proc::memplane(&["primary", "--runtime-dir", &dir.arg()]);
    p.expect_line("primary ready", Duration::from_secs(20));
    p
}

/// Ten seconds: generous bound for anything that should take milliseconds.
pub const LONG: Duration = Duration::from_secs(10);
