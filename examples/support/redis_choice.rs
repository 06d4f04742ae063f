//! Which Redis an example talks to, shared by the examples that start processes: `--redis`,
//! else `REDIS_URL`, else `redis://127.0.0.1:6379`, else a throwaway `redis-server`.

use std::time::Duration;

use super::redis_server;

/// Whether a Redis at `url` answers `PING` within 2 s.
pub async fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)))
}

/// Finds a Redis per the contract; returns its URL and the throwaway server, if one was started.
pub async fn resolve_redis(flag: Option<String>) -> Result<(String, Option<redis_server::RedisServer>), String> {
    // The environment is read once, here.
    if let Some(url) = flag.or_else(|| std::env::var("REDIS_URL").ok()) {
        if answers(&url).await {
            return Ok((url, None));
        }
        return Err(format!(
            "Redis at {url} (from --redis or REDIS_URL) does not answer PING"
        ));
    }
    let default = "redis://127.0.0.1:6379".to_string();
    if answers(&default).await {
        return Ok((default, None));
    }
    if !redis_server::redis_server_available() {
        return Err(format!(
            "no Redis answers at {default} and redis-server is not on PATH. Start Redis, pass --redis URL, \
             or install it: sudo apt-get install redis-server (Debian/Ubuntu), brew install redis (macOS)"
        ));
    }
    let server = tokio::task::spawn_blocking(redis_server::RedisServer::start)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "no Redis at {default}; started a throwaway redis-server at {} (stopped at the end)",
        server.url()
    );
    Ok((server.url(), Some(server)))
}
