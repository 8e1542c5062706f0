//! sqlx::migrate! embeds the migrations at compile time but cannot tell cargo that a new file
//! appeared in their directory: without this, an incremental build misses a migration just added.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations/fulfilment");
}
