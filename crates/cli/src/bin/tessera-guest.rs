//! `tessera-guest`: PID 1 of a `tessera run` microVM (see `tessera_guest`).

fn main() {
    tessera_guest::main();
}
