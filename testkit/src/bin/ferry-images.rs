//! `ferry-images BIN_DIR OUT_DIR [TAG]`: writes ferry's images (controller, node,
//! launcher) as OCI archives built from the binaries in BIN_DIR, tagged TAG (default:
//! the workspace version). `scripts/build-images.sh` runs it on a release build.
use ferry_testkit::oci::ferry::{NodeTools, build_all, version};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(bin_dir), Some(out_dir)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: ferry-images BIN_DIR OUT_DIR [TAG]");
    };
    let tag = args.get(2).map(String::as_str).unwrap_or(version());
    let started = Instant::now();
    let built = build_all(
        &PathBuf::from(bin_dir),
        tag,
        &NodeTools::from_host()?,
        &PathBuf::from(out_dir),
    )?;
    for b in &built {
        println!(
            "{}\t{}\t{:.1} MiB\t{}",
            b.reference,
            b.digest,
            b.bytes as f64 / (1 << 20) as f64,
            b.archive.display()
        );
    }
    eprintln!("images written in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
