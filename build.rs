//! Compiles `proto/grpo/v1/*.proto` with a vendored protoc and points the binary's RUNPATH at
//! libtorch, so tests and binaries run without LD_LIBRARY_PATH.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let mut protos: Vec<_> = std::fs::read_dir("proto/grpo/v1")?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    protos.sort();
    tonic_prost_build::configure().compile_protos(&protos, &[std::path::PathBuf::from("proto")])?;
    println!("cargo:rerun-if-changed=proto");

    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // Rust links with --as-needed, which would drop libtorch_cuda and hide CUDA from tch.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    Ok(())
}
