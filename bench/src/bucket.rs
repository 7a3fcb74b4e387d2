//! Containers through a bucket (`transfer.mode: ObjectStore`, Cold) beside the same
//! move with `transfer.mode: Direct` in the same run, with the floor of the bucket path
//! beside both: a plain PUT then GET of as many bytes through the same MinIO, with
//! ferry's S3 client and no migration.
//!
//! The destination reads each part as soon as it is uploaded, so the bucket path's
//! downtime can be below dump + PUT + GET + restore; the interesting numbers are
//! ObjectStore / Direct (what the bucket costs) and ObjectStore against PUT + GET.
use crate::Measurement;
use anyhow::Result;
use ferry_e2e::world::World;
use ferry_testkit::minio::{ACCESS_KEY, MinioServer, SECRET_KEY};
use ferry_transfer::{ReceiveOptions, S3Config, S3Credentials, S3SendOptions, S3Store};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

pub(crate) const BUCKET: &str = "ferry-bench";

/// The Migration's `transfer:` for the bench's MinIO; `credentialsSecret: s3` must exist
/// in the Migration's namespace ([`create_secret`]).
pub(crate) fn transfer_yaml(minio: &MinioServer) -> String {
    ferry_e2e::world::object_store_transfer(&minio.endpoint(), BUCKET, "bench", "s3")
}

pub(crate) async fn create_secret(w: &World, ns: &str) -> Result<()> {
    w.create_s3_secret(ns, "s3", ACCESS_KEY, SECRET_KEY).await
}

/// Milliseconds to PUT `mib` MiB as one stream and then to GET it back (read to the
/// end, every part checked), with ferry's S3 client as ferry's bundles use it: streamed
/// layout, 4 MiB parts, 4 in parallel, encrypted. One after the other: the floor of a
/// bucket path without overlap, which ferry's download-while-uploading can beat.
pub(crate) async fn put_get(minio: &MinioServer, mib: u64) -> Result<(f64, f64)> {
    let store = S3Store::new(&S3Config {
        endpoint: minio.endpoint(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: "baseline".into(),
        credentials: S3Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            session_token: None,
        },
        path_style: true,
        request_timeout: Duration::from_secs(60),
    })?;
    let key = b"bench key".to_vec();
    let id = format!("put-get-{mib}");
    let bytes = tokio::io::repeat(0xa5).take(mib << 20);
    let t0 = Instant::now();
    let opts = S3SendOptions {
        seal_key: Some(key.clone()),
        encryption_key: Some(key.clone()),
        part_size: 4 << 20,
        ..Default::default()
    };
    store.send_streamed(&id, bytes, &opts).await?;
    let put = t0.elapsed().as_secs_f64() * 1000.0;
    let t1 = Instant::now();
    let opts = ReceiveOptions {
        seal_key: Some(key.clone()),
        encryption_key: Some(key),
        ..Default::default()
    };
    let mut incoming = store.receive_streamed(&id, &opts).await?;
    let got = tokio::io::copy(&mut incoming, &mut tokio::io::sink()).await?;
    let get = t1.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        got == mib << 20,
        "GET returned {got} bytes of {}",
        mib << 20
    );
    store
        .delete_prefix(&format!("{id}/"), &Default::default())
        .await?;
    Ok((put, get))
}

/// The case's two measurements: ObjectStore (ferry) against Direct (baseline), the
/// plain PUT + GET in the details.
pub(crate) fn measurements(
    mib: u64,
    runs: usize,
    store: (f64, f64),
    direct: (f64, f64),
    (put, get): (f64, f64),
    steps: Option<serde_json::Value>,
) -> Vec<Measurement> {
    let mut details = serde_json::Map::new();
    if let Some(steps) = steps {
        details.insert("ferry_steps".into(), steps);
    }
    details.insert("rss_mib".into(), mib.into());
    details.insert("runs".into(), runs.into());
    details.insert("minio_put_ms".into(), put.round().into());
    details.insert("minio_get_ms".into(), get.round().into());
    details.insert("minio_put_get_ms".into(), (put + get).round().into());
    details.insert(
        "route".into(),
        "east-1 -> bucket -> west-1 (across clusters)".into(),
    );
    Measurement::downtime_and_total(
        &format!("containers/objectstore-cold-{mib}MiB"),
        "ferry Cold with transfer.mode Direct, same run",
        &details,
        store,
        direct,
    )
}
