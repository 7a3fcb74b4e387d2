//! The committed CRD YAML must be exactly what `crdgen` generates from the Rust types.
#[test]
fn committed_crd_yaml_matches_the_types() {
    let committed = include_str!("../yaml/crds.yaml");
    let generated = ferry_crds::crds_yaml();
    assert!(
        committed == generated,
        "crds/yaml/crds.yaml is stale: run `cargo run -p ferry-crds --bin crdgen > crds/yaml/crds.yaml`"
    );
}

#[test]
fn committed_admission_yaml_matches_the_code() {
    let committed = include_str!("../yaml/admission.yaml");
    assert!(
        committed == ferry_crds::admission_yaml(),
        "crds/yaml/admission.yaml is stale: run `cargo run -p ferry-crds --bin crdgen -- admission > crds/yaml/admission.yaml`"
    );
}
