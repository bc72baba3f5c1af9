//! `r6t-member`: a member node calling the orchestration master with its
//! own node identity (certificate and signed requests, as its agent does).
//! The netns tests run it to show what a member may not do: request,
//! read or destroy instances. Prints the answer; exits 1 on a refusal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use re6st_orchestration::client::{Credentials, MasterClient};
use re6st_orchestration::identity::LiveIdentity;
use re6st_orchestration::master::RequestBody;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Call the orchestration master as a member node (its re6st-conf identity)"
)]
struct Cli {
    /// The node's re6st-conf directory.
    #[arg(long)]
    dir: PathBuf,
    /// The master's URL.
    #[arg(long)]
    master: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// Instance name.
        name: String,
    },
    /// Request an instance.
    Request {
        /// Software.
        software: String,
        /// Instance name.
        name: String,
        /// On this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Destroy an instance.
    Destroy {
        /// Instance name.
        name: String,
    },
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let id = LiveIdentity::from_dir(&cli.dir)?;
    let c = MasterClient::new(&cli.master, Credentials::Node(std::sync::Arc::new(id)))?;
    Ok(match cli.cmd {
        Cmd::List => format!("{:?}", c.list().await?),
        Cmd::Show { name } => c.show(&name).await?.to_string(),
        Cmd::Request {
            software,
            name,
            node,
        } => {
            let body = RequestBody {
                name,
                software,
                params: Default::default(),
                node,
                near: None,
                copies: None,
            };
            format!("{:?}", c.request(&body).await?)
        }
        Cmd::Destroy { name } => format!("{:?}", c.destroy(&name).await?),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match re6stnet::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("r6t-member: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("r6t-member: {e:#}");
            ExitCode::FAILURE
        }
    }
}
