//! Compiles `proto/tribute/v1/*.proto` with the vendored `protoc` (no system protoc needed)
//! and writes a file descriptor set for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "tribute/v1/errors.proto",
        "tribute/v1/registry.proto",
        "tribute/v1/metering.proto",
        "tribute/v1/channels.proto",
        "tribute/v1/receipts.proto",
        "tribute/v1/auth.proto",
        "tribute/v1/operator.proto",
        "tribute/v1/reputation.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tribute_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
