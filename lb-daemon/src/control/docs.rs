//! Man pages and shell completions, generated from the command lines'
//! clap definitions so that they can never disagree with `--help`. Used by
//! the hidden `--generate-docs DIR` of lbd and lbctl, which `cargo xtask
//! dist` runs to fill the package.

use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Write `DIR/NAME.SECTION` (a man page) and `DIR/completions/{bash,zsh,
/// fish}/...` for `command`.
pub fn generate(mut command: clap::Command, section: &str, dir: &Path) -> Result<()> {
    let name = command.get_name().to_string();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // One page per visible subcommand too (`lbctl-status.1`, ...), since
    // the top page refers to them by those names.
    command.build();
    write_pages(command.clone(), section, dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let out = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        clap_complete::generate_to(shell, &mut command, &name, &out)
            .with_context(|| format!("writing the {shell} completion of {name}"))?;
    }
    Ok(())
}

fn write_pages(command: clap::Command, section: &str, dir: &Path) -> Result<()> {
    for sub in command
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_pages(sub.clone(), section, dir)?;
    }
    let man = clap_mangen::Man::new(command).section(section);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("rendering {}", path.display()))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))
}
