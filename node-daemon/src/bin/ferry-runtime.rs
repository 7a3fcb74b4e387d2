//! `ferry-runtime`: the OCI runtime behind containerd's `ferry` RuntimeClass. Passes
//! every call to runc, except that it restores migration targets (see
//! `ferry_node::containers::wrapper`).
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(ferry_node::containers::wrapper::main(
        std::env::args().collect(),
    ));
}
