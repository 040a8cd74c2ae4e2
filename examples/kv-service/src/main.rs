//! The kv-service worker binary (started by a Lazarus agent).

fn main() -> std::process::ExitCode {
    lazarus_sdk::run_worker(kv_service::registry())
}
