// Expose the cargo profile to the crate so Python benchmarks can refuse to time a debug build.
fn main() {
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=PROFILE={profile}");
    println!("cargo:rerun-if-changed=build.rs");
}
