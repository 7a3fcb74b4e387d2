//! Prints ferry's CRDs; `crdgen > crds/yaml/crds.yaml` regenerates the committed copy.
fn main() {
    print!("{}", ferry_crds::crds_yaml());
}
