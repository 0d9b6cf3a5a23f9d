//! `ic-directory <socket-path>`: the interconnect directory service on its
//! own (partd will host the same server later). Runs until killed.
use std::path::PathBuf;

fn main() {
    let Some(path) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: ic-directory <socket-path>");
        std::process::exit(2);
    };
    match interconnect::DirectoryServer::serve(&path) {
        Ok(_server) => {
            println!("ic-directory: serving {}", path.display());
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("ic-directory: {e}");
            std::process::exit(1);
        }
    }
}
