//! `docker/`: no container engine runs here, so the compose file is checked against the
//! repository instead — every image it builds has a Dockerfile that builds the binaries it
//! runs, every binary it runs is a binary of the workspace, every file it mounts exists,
//! every config file it mounts loads with the real loader (daemon or CLI), and every port it
//! publishes or exposes is one those configs listen on.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn docker() -> PathBuf {
    repo().join("docker")
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(docker().join("compose.yaml")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn strings(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::String(s) => vec![s.clone()],
        Yaml::Array(a) => a.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// Binary names declared by the workspace members' `[[bin]]` sections.
fn workspace_binaries() -> BTreeSet<String> {
    let root: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let mut bins = BTreeSet::new();
    for m in root["workspace"]["members"].as_array().unwrap() {
        let manifest = repo().join(m.as_str().unwrap()).join("Cargo.toml");
        let t: toml::Value = toml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
        for b in t.get("bin").and_then(|b| b.as_array()).into_iter().flatten() {
            bins.insert(b["name"].as_str().unwrap().to_owned());
        }
    }
    bins
}

/// The `ENTRYPOINT ["…", …]` of a Dockerfile.
fn dockerfile_entrypoint(dockerfile: &str) -> Vec<String> {
    let line = dockerfile.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("ENTRYPOINT");
    strings(&YamlLoader::load_from_str(line).unwrap().remove(0))
}

/// The words of a service's entrypoint (its own, or its image's) and command that name one
/// of `binaries`.
fn binaries_run(
    service: &Yaml,
    image_entrypoint: Option<Vec<String>>,
    binaries: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut words: Vec<String> = Vec::new();
    let entrypoint = if service["entrypoint"].is_badvalue() {
        image_entrypoint.unwrap_or_default()
    } else {
        strings(&service["entrypoint"])
    };
    for part in [entrypoint, strings(&service["command"])] {
        for s in part {
            words.extend(
                s.split(|c: char| c.is_whitespace() || "();&|".contains(c)).map(str::to_owned),
            );
        }
    }
    words.into_iter().filter(|w| binaries.contains(w)).collect()
}

/// `host:container` bind mounts with a host path in the repository (named volumes skipped).
fn bind_mounts(service: &Yaml) -> Vec<(PathBuf, String)> {
    strings(&service["volumes"])
        .iter()
        .filter(|v| v.starts_with("./") || v.starts_with("../"))
        .map(|v| {
            let mut parts = v.split(':');
            let host = docker().join(parts.next().unwrap());
            (host, parts.next().unwrap().to_owned())
        })
        .collect()
}

/// Container ports a service publishes (`ports`) or exposes (`expose`).
fn ports(service: &Yaml) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for p in strings(&service["ports"]) {
        out.insert(p.rsplit(':').next().unwrap().parse().unwrap());
    }
    for p in strings(&service["expose"]) {
        out.insert(p.parse().unwrap());
    }
    out
}

#[test]
fn compose_names_only_what_the_repository_has() {
    let c = compose();
    let services = c["services"].as_hash().expect("services");
    let binaries = workspace_binaries();
    assert!(binaries.contains("tributed") && binaries.contains("tribute"), "{binaries:?}");
    let mut images_built = Vec::new();
    let mut ran = BTreeSet::new();
    let mut checked_configs = 0;
    for (name, s) in services {
        let name = name.as_str().unwrap();
        // Built images: the Dockerfile exists, in a context that exists, and copies out
        // every workspace binary this stack runs.
        if let Some(build) = s["build"].as_hash() {
            let _ = build;
            let context = docker().join(s["build"]["context"].as_str().unwrap());
            assert!(context.join("Cargo.toml").exists(), "{name}: context {context:?}");
            let dockerfile = context.join(s["build"]["dockerfile"].as_str().unwrap());
            let text = std::fs::read_to_string(&dockerfile)
                .unwrap_or_else(|e| panic!("{name}: {dockerfile:?}: {e}"));
            images_built.push((s["image"].as_str().unwrap().to_owned(), text));
        }
        for (host, container) in bind_mounts(s) {
            assert!(host.exists(), "{name}: mounts {host:?}, which is not in the repository");
            // Config files load with the code that will read them.
            if container.ends_with("tributed.toml") {
                let config = tribute_daemon::config::Config::load(
                    Some(&host),
                    &tribute_daemon::config::ConfigArgs::default(),
                )
                .unwrap_or_else(|e| panic!("{host:?}: {e}"));
                let listen: BTreeSet<u16> = [
                    Some(config.listen.port()),
                    config.metrics_listen.map(|a| a.port()),
                    config.lightning.enabled.then_some(config.lightning.listen_port),
                ]
                .into_iter()
                .flatten()
                .collect();
                assert_eq!(ports(s), listen, "{name}: published ports vs tributed.toml");
                // Every file the config names is mounted into the container.
                let tls = config.tls.expect("TLS beyond loopback");
                for f in [&tls.cert_path, &tls.key_path] {
                    let dir = f.parent().unwrap().to_str().unwrap();
                    assert!(
                        strings(&s["volumes"]).iter().any(|v| v.split(':').nth(1) == Some(dir)),
                        "{name}: {f:?} is not mounted"
                    );
                }
                checked_configs += 1;
            }
            if container.ends_with("contributor.toml") {
                let config = tribute_client::config::CliConfig::load_from(
                    Some(&host),
                    &tribute_client::config::GlobalArgs::default(),
                )
                .unwrap_or_else(|e| panic!("{host:?}: {e}"));
                let url = config.daemon.clone();
                let (host_part, port) =
                    url.trim_start_matches("https://").split_once(':').expect("host:port");
                assert!(services.contains_key(&Yaml::String(host_part.into())), "{url}");
                let target = &c["services"][host_part];
                assert!(ports(target).contains(&port.parse().unwrap()), "{url} not served");
                let ca = config.tls_ca.expect("https needs the CA");
                let dir = ca.parent().unwrap().to_str().unwrap();
                assert!(strings(&s["volumes"]).iter().any(|v| v.split(':').nth(1) == Some(dir)));
                checked_configs += 1;
            }
        }
    }
    // What each service runs: its entrypoint, or the entrypoint of the image built here.
    for s in services.values() {
        let image = s["image"].as_str().unwrap_or_default();
        let entrypoint = images_built
            .iter()
            .find(|(built, _)| built == image)
            .map(|(_, dockerfile)| dockerfile_entrypoint(dockerfile));
        ran.extend(binaries_run(s, entrypoint, &binaries));
    }
    assert_eq!(checked_configs, 2, "both config files are mounted and checked");
    assert!(ran.contains("tributed") && ran.contains("tribute"), "{ran:?}");
    for bin in &ran {
        assert!(
            images_built
                .iter()
                .any(|(_, dockerfile)| dockerfile.contains(&format!("target/release/{bin} "))
                    && dockerfile.contains(&format!("--bin {bin}"))),
            "no Dockerfile builds and copies {bin}"
        );
    }
    // The Dockerfile builds with the same toolchain rules as CI: locked, from the workspace.
    for (_, dockerfile) in &images_built {
        assert!(dockerfile.contains("cargo build --release --locked"));
    }
}
