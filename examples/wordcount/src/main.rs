//! The wordcount worker binary. Started by a lazarus agent it runs one
//! operator of the job; `wordcount generate WORDS FILE [SEED [TAIL]]` writes a test
//! corpus and `wordcount check INPUT OUTPUT_DIR` compares a run's output with
//! an independent count of the input.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("check") {
        return match wordcount::check_cli(&args[2..]) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wordcount check: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.get(1).map(String::as_str) == Some("generate") {
        return match wordcount::generate_cli(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wordcount generate: {e}");
                ExitCode::from(2)
            }
        };
    }
    lazarus_sdk::run_worker(wordcount::registry())
}
