//! Compiles `proto/grpo/v1/*.proto` with a vendored protoc, compiles the C++ shim in `csrc/`
//! against libtorch's headers, and points the binary's RUNPATH at libtorch, so tests and
//! binaries run without LD_LIBRARY_PATH.

use std::error::Error;
use std::path::PathBuf;

/// Compiles `csrc/` (the libtorch operations tch does not bind) against the libtorch that
/// torch-sys found.
fn compile_shim(lib: &std::path::Path) {
    let torch = lib.parent().map(PathBuf::from).unwrap_or_default();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .include("csrc/gloo_api")
        .file("csrc/shim.cpp")
        .file("csrc/dist.cpp");
    build.compile("grpo_shim");
    println!("cargo:rerun-if-changed=csrc");
}

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

    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
        compile_shim(std::path::Path::new(&lib));
        println!("cargo:rustc-link-search=native={}", lib.to_string_lossy());
        println!("cargo:rustc-link-lib=dylib=torch_cpu");
        println!("cargo:rustc-link-lib=dylib=c10");
    }
    if cuda {
        // Rust links with --as-needed, which would drop libtorch_cuda and hide CUDA from tch.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    Ok(())
}
