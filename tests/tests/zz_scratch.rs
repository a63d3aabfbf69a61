use lb_tests::{Lab, LabDesc};
#[test]
fn scratch() -> anyhow::Result<()> {
    let mut desc = LabDesc::shipped("default")?;
    if std::env::var("NOOFF").is_ok() {
        desc.links[0].a.offload.clear();
    }
    if std::env::var("NOSYS").is_ok() {
        for h in desc.hosts.values_mut() {
            h.sysctl.clear();
        }
    }
    let lab = Lab::up(&desc, "lbscratch-")?;
    println!(
        "{}",
        lab.exec("router", &["ip", "-br", "link", "show", "lan0"])?
    );
    println!(
        "{}",
        lab.exec("client", &["ip", "-br", "link", "show", "eth0"])?
    );
    Ok(())
}
