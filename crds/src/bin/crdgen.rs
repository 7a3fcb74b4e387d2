//! Prints ferry's CRDs (`crdgen > crds/yaml/crds.yaml`) or, with `admission`, the
//! admission policy that guards the restore markers (`crdgen admission >
//! crds/yaml/admission.yaml`): the committed copies are regenerated this way.
fn main() {
    match std::env::args().nth(1).as_deref() {
        None => print!("{}", ferry_crds::crds_yaml()),
        Some("admission") => print!("{}", ferry_crds::admission_yaml()),
        Some(other) => {
            eprintln!("crdgen: unknown argument {other:?}; usage: crdgen [admission]");
            std::process::exit(2);
        }
    }
}
