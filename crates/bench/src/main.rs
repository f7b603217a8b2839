//! `flotilla-bench`: parse flags, run the rows, print the table.

use clap::Parser;
use flotilla_bench::{BenchArgs, run};

#[tokio::main]
async fn main() {
    let args = BenchArgs::parse();
    let table = run(&args).await;
    println!("{table}");
}
