//! What the operator said with `lbctl uplink` (disable, drain, weight),
//! kept across restarts in the state directory (`operator.json`): a line
//! taken out for maintenance stays out through an upgrade, a reload that
//! starts lbd again, or a crash. This module owns the file and what it
//! means; the daemon applies it. It never touches the kernel.
//!
//! A weight is kept only while the configuration still gives the uplink
//! the weight it had when the operator set it: an edited file wins. An
//! uplink no longer configured loses what was said of it.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::uplink::Admin;

/// The file in the state directory.
pub const FILE: &str = "operator.json";

/// What the operator said, by uplink name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Said {
    pub uplinks: BTreeMap<String, UplinkSaid>,
}

/// What the operator said of one uplink: only what differs from the
/// configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkSaid {
    /// "disabled" or "drain" (enabled is said by saying nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<KeptWeight>,
}

/// A weight set by the operator, and the configured one it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptWeight {
    pub set: u32,
    pub configured: u32,
}

impl Said {
    /// Record uplink `name`'s state after an operator's command: `admin`,
    /// and `weight` against the `configured` one.
    pub fn record(&mut self, name: &str, admin: Admin, weight: u32, configured: u32) {
        let said = UplinkSaid {
            admin: (admin != Admin::Enabled).then(|| admin.as_str().to_owned()),
            weight: (weight != configured).then_some(KeptWeight {
                set: weight,
                configured,
            }),
        };
        if said == UplinkSaid::default() {
            self.uplinks.remove(name);
        } else {
            self.uplinks.insert(name.to_owned(), said);
        }
    }

    /// Forget a weight the configuration changed under (`configured` is
    /// its weight now); whether anything was forgotten.
    pub fn forget_stale_weight(&mut self, name: &str, configured: u32) -> bool {
        let Some(said) = self.uplinks.get_mut(name) else {
            return false;
        };
        if said.weight.is_none_or(|w| w.configured == configured) {
            return false;
        }
        said.weight = None;
        if *said == UplinkSaid::default() {
            self.uplinks.remove(name);
        }
        true
    }

    /// What to put back for uplink `name` configured with weight
    /// `configured`: its admin state, if the operator took it out, and
    /// its weight, if the configuration has not changed it since.
    pub fn kept(&self, name: &str, configured: u32) -> (Option<Admin>, Option<u32>) {
        let Some(said) = self.uplinks.get(name) else {
            return (None, None);
        };
        let admin = match said.admin.as_deref() {
            Some("disabled") => Some(Admin::Disabled),
            Some("drain") => Some(Admin::Drain),
            _ => None,
        };
        let weight = said
            .weight
            .filter(|w| w.configured == configured)
            .map(|w| w.set);
        (admin, weight)
    }
}

/// Read the file; none is nothing said.
pub fn load(path: &Path) -> Result<Said> {
    read_json(path, "the uplinks then start as configured")
}

/// Write the file (see [`write_json`]).
pub fn save(path: &Path, said: &Said) -> Result<()> {
    write_json(path, said)
}

/// A state file lbd wrote, or `T`'s default when there is none; `if_bad`
/// tells the operator what moving a bad one away does.
pub fn read_json<T: DeserializeOwned + Default>(path: &Path, if_bad: &str) -> Result<T> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a file lbd wrote (move it away: {if_bad})",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write a state file whole or not at all (a new file renamed over the
/// old one), so that a crash never leaves half of it.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)
        .with_context(|| format!("encoding {}", path.display()))?;
    let new = path.with_extension("new");
    std::fs::write(&new, text).with_context(|| format!("writing {}", new.display()))?;
    std::fs::rename(&new, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_differs_from_the_configuration_is_kept_and_an_edited_weight_wins() {
        let mut said = Said::default();
        said.record("isp2", Admin::Disabled, 1, 1);
        said.record("isp3", Admin::Enabled, 5, 2);
        assert_eq!(said.kept("isp2", 1), (Some(Admin::Disabled), None));
        assert_eq!(said.kept("isp3", 2), (None, Some(5)));
        // The file's weight for isp3 changed since: it wins.
        assert_eq!(said.kept("isp3", 4), (None, None));
        assert!(said.forget_stale_weight("isp3", 4));
        assert!(!said.uplinks.contains_key("isp3"));
        // Enabled again at its configured weight: nothing left to keep.
        said.record("isp2", Admin::Enabled, 1, 1);
        assert!(said.uplinks.is_empty());
        assert_eq!(said.kept("isp1", 1), (None, None));
    }

    #[test]
    fn the_file_is_written_whole_and_read_back() {
        let dir = std::env::temp_dir().join(format!("lb-kept-{}", std::process::id()));
        let path = dir.join(FILE);
        let mut said = Said::default();
        said.record("isp1", Admin::Drain, 3, 1);
        let saved = save(&path, &said);
        let back = load(&path);
        let missing = load(&dir.join("none.json"));
        std::fs::write(&path, b"{ not json").expect("write");
        let bad = load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        saved.expect("save");
        assert_eq!(back.expect("load"), said);
        assert_eq!(missing.expect("a missing file"), Said::default());
        let bad = format!("{:#}", bad.expect_err("a bad file"));
        assert!(bad.contains("not a file lbd wrote"), "{bad}");
    }
}
