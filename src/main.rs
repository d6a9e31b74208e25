//! The `memplane` command line. See `memplane --help`.
use clap::Parser;

fn main() {
    let cli = memplane::cli::Cli::parse();
    std::process::exit(memplane::cli::run(cli));
}
