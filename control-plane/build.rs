//! Embeds the web console's built files (`ui/dist`, committed; `npm run build` in `ui/` makes
//! them from `ui/src`) into the binary: `OUT_DIR/ui_assets.rs` lists each file's name and
//! bytes, for `src/ui.rs`.

use std::fmt::Write as _;
use std::path::Path;
use std::{env, fs};

fn main() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/dist");
    println!("cargo:rerun-if-changed=ui/dist");
    let mut names: Vec<String> = match fs::read_dir(&dist) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) => panic!(
            "{}: {e}; the console's built files are committed: restore them with git, or build them with `npm ci && npm run build` in control-plane/ui",
            dist.display()
        ),
    };
    names.sort();
    let mut out = String::from("/// The console's files: name under `/ui/`, bytes.\npub static ASSETS: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let path = dist.join(name);
        let _ = writeln!(
            out,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    out.push_str("];\n");
    let target = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ui_assets.rs");
    fs::write(&target, out).expect("write ui_assets.rs");
}
