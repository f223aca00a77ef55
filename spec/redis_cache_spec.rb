# frozen_string_literal: true

require "spec_helper"
require "net/http"
require "socket"
require "tmpdir"
require "uri"
require "zlib"

# The shared cache tier through `thrust`, against a real Puma and a real
# redis-server: instances sharing one Redis, Redis failing under traffic,
# purges across instances (one of them stopped), and CACHE_RELEASE. Every
# example starts its own redis-server on a free loopback port, and every
# proxy has its own STORAGE_PATH unless the example shares one on purpose.
RSpec.describe "shared cache tier (Redis) and purge" do
  def public_cc = "cc=public,+max-age%3D600"

  # A fixed Host: the proxies listen on different ports, and the host (port
  # included) is part of the cache key.
  def get(port, path, headers = {})
    identity_request(port, path, headers: { "Host" => "shared.test" }.merge(headers))
  end

  def hits(port, path)
    Integer(identity_request(port, "/hits?path=#{URI.encode_www_form_component(path)}").body)
  end

  def start_redis
    port = free_port
    redis = ChildProcess.start({}, "redis-server", "--port", port.to_s, "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no")
    wait_until(message: "redis-server answering PING") { redis_call(port, "PING") == "+PONG" }
    [redis, port]
  end

  # One inline command; the first line of the answer.
  def redis_call(port, *words)
    Socket.tcp("127.0.0.1", port, connect_timeout: 1) do |s|
      s.write("#{words.join(' ')}\r\n")
      s.gets&.chomp
    end
  rescue SystemCallError
    nil
  end

  # Entries (not vary records or purge sets) the proxies stored.
  def redis_entries(port)
    Integer(redis_call(port, "EVAL", '"return #redis.call(\'KEYS\', ARGV[1])"', "0",
                       "thruster:v1:[0-9a-f]*")[1..])
  end

  def start(redis_port, env = {})
    start_thrust_with_puma(env: { "CACHE_REDIS_URL" => "redis://127.0.0.1:#{redis_port}",
                                  "LOG_REQUESTS" => "false" }.merge(env))
  end

  def stop(thrust)
    thrust.signal("TERM")
    thrust.wait(timeout: 30)
  end

  def purge_through_app(port, target)
    identity_request(port, "/purge?target=#{URI.encode_www_form_component(target)}")
  end

  it "serves what one instance stored as a hit on another's first request, and promotes it locally" do
    redis, redis_port = start_redis
    a, a_port = start(redis_port)
    b, b_port = start(redis_port)
    path = "/cache/shared.css?#{public_cc}&size=30000"
    first = get(a_port, path)
    expect(first["x-cache"]).to eq("miss")
    # Written to Redis after the response was sent.
    wait_until(message: "the entry in Redis") { redis_entries(redis_port) == 1 }

    from_redis = get(b_port, path)
    expect(from_redis["x-cache"]).to eq("hit")
    expect(from_redis.body).to eq(first.body)
    expect(Integer(from_redis["age"])).to be >= 0
    gzip = get(b_port, path, { "Accept-Encoding" => "gzip" })
    expect([gzip["x-cache"], gzip["content-encoding"]]).to eq(%w[hit gzip])
    expect(Zlib.gunzip(gzip.body)).to eq(first.body)
    expect(hits(b_port, "/cache/shared.css")).to eq(0)

    # Promoted into B's disk: with Redis emptied, B restarted finds it there.
    stop(b)
    expect(redis_call(redis_port, "FLUSHALL")).to eq("+OK")
    b2, b2_port = start(redis_port, "STORAGE_PATH" => b.storage_path)
    again = get(b2_port, path)
    expect([again["x-cache"], again.body]).to eq(["hit", first.body])
    expect(hits(b2_port, "/cache/shared.css")).to eq(0)
    # ... and in its memory: it no longer needs Redis.
    redis.signal("KILL")
    redis.wait(timeout: 10)
    expect(get(b2_port, path)["x-cache"]).to eq("hit")
    stop(b2)
    # But a process started while Redis is unreachable cannot know whether
    # another instance purged what its disk held from before: a miss (the
    # app answers), never a page that may have been purged.
    b3, b3_port = start(redis_port, "STORAGE_PATH" => b.storage_path, "CACHE_REDIS_TIMEOUT_MS" => "100")
    expect(get(b3_port, path)["x-cache"]).to eq("miss")
    expect(get(b3_port, path)["x-cache"]).to eq("hit")
    [a, b3].each { |t| stop(t) }
  end

  it "reports the shared tier in the metrics" do
    redis, redis_port = start_redis
    metrics = free_port
    thrust, port = start(redis_port, "METRICS_PORT" => metrics.to_s)
    get(port, "/cache/m.css?#{public_cc}")
    wait_until(message: "the entry in Redis") { redis_entries(redis_port) == 1 }
    scrape = -> { Net::HTTP.get(URI("http://127.0.0.1:#{metrics}/metrics")) }
    text = scrape.call
    expect(text).to match(/^thruster_cache_redis_up 1$/)
    expect(text).to match(/^thruster_cache_redis_operations_total\{result="stored"\} 1$/)
    redis.signal("KILL")
    redis.wait(timeout: 10)
    wait_until(message: "the tier to report down") { scrape.call.match?(/^thruster_cache_redis_up 0$/) }
    stop(thrust)
  end

  it "answers every request while Redis is stopped (SIGSTOP) or killed mid-traffic, none slower than the " \
     "timeout plus the app" do
    redis, redis_port = start_redis
    thrust, port = start(redis_port, "CACHE_REDIS_TIMEOUT_MS" => "100")
    expect(get(port, "/cache/warm.css?#{public_cc}")["x-cache"]).to eq("miss")
    wait_until(message: "the entry in Redis") { redis_entries(redis_port) == 1 }

    timed = lambda do |i|
      started = monotonic
      response = get(port, "/cache/t#{i}.css?#{public_cc}")
      [response.code, monotonic - started]
    end
    expect((0...5).map { |i| timed.call(i).first }).to all(eq("200"))

    redis.signal("STOP")
    during = (5...45).map { |i| timed.call(i) }
    expect(during.map(&:first)).to all(eq("200"))
    # The app answers these in a few ms; the proxy waits at most 100 ms for
    # Redis per lookup. A generous ceiling: the machine is shared.
    expect(during.map(&:last).max).to be < 1.5
    expect(get(port, "/cache/warm.css?#{public_cc}")["x-cache"]).to eq("hit")

    redis.signal("CONT")
    redis.signal("KILL")
    redis.wait(timeout: 10)
    after = (45...65).map { |i| timed.call(i) }
    expect(after.map(&:first)).to all(eq("200"))
    expect(after.map(&:last).max).to be < 1.5
    expect(thrust.output).not_to match(/panick/i)
    stop(thrust)
  end

  it "starts and serves while Redis hangs" do
    redis, redis_port = start_redis
    redis.signal("STOP")
    thrust, port = start(redis_port, "CACHE_REDIS_TIMEOUT_MS" => "100")
    path = "/cache/hung.css?#{public_cc}"
    started = monotonic
    expect(get(port, path)["x-cache"]).to eq("miss")
    expect(get(port, path)["x-cache"]).to eq("hit")
    expect(monotonic - started).to be < 3
    redis.signal("CONT")
    stop(thrust)
  end

  it "purges an entry on every instance, including one that was stopped during the purge" do
    _redis, redis_port = start_redis
    # Each app writes its tag into the bodies it makes, so a body tells which
    # app made it: the copy stored before the purge is alpha's.
    tags = { a: "app-alpha", b: "app-bravo", c: "app-charlie" }
    a, a_port = start(redis_port, "APP_TAG" => tags[:a])
    page = "/cache/news.html?#{public_cc}&type=text/html"
    other = "/cache/other.css?#{public_cc}"
    expect(get(a_port, page).body).to include(tags[:a])
    get(a_port, other)
    wait_until(message: "both entries in Redis") { redis_entries(redis_port) == 2 }
    b, b_port = start(redis_port, "APP_TAG" => tags[:b])
    c, c_port = start(redis_port, "APP_TAG" => tags[:c])
    [b_port, c_port].each do |port|
      [page, other].each do |path|
        response = get(port, path)
        expect([response["x-cache"], response.body.include?(tags[:a])]).to eq(["hit", true])
      end
    end
    stop(c) # its disk keeps alpha's page

    answer = purge_through_app(a_port, "/cache/news.html*")
    expect(answer.code).to eq("200")
    expect(JSON.parse(answer.body)).to include("purged" => "/cache/news.html*", "shared" => "ok")

    # Charlie comes back with alpha's page on its disk (and alpha's copy is
    # still in Redis): the purge records it loads from Redis keep both from
    # being served; its own app answers.
    c2, c2_port = start(redis_port, "APP_TAG" => tags[:c], "STORAGE_PATH" => c.storage_path)
    fresh = get(c2_port, page)
    expect([fresh["x-cache"], fresh.body.include?(tags[:c])]).to eq(["miss", true])
    expect(get(c2_port, other)["x-cache"]).to eq("hit")

    # Bravo ran all along and learned of the purge on the channel: never
    # alpha's old copy again (its own app's or charlie's new one instead).
    bravo = get(b_port, page)
    expect(bravo.body).not_to include(tags[:a])
    # Alpha: a body of its own app only if its app was asked again.
    alpha_before = hits(a_port, "/cache/news.html")
    alpha = get(a_port, page)
    expect(alpha.body.include?(tags[:a]) && hits(a_port, "/cache/news.html") == alpha_before).to be(false)
    # What the purge did not name stays.
    expect([get(a_port, other)["x-cache"], get(b_port, other)["x-cache"]]).to eq(%w[hit hit])
    [a, b, c2].each { |t| stop(t) }
  end

  it "purges the local tiers without Redis, across a restart" do
    thrust, port = start_thrust_with_puma(env: { "LOG_REQUESTS" => "false" })
    storage = thrust.storage_path
    page = "/cache/local.html?#{public_cc}&type=text/html"
    get(port, page)
    expect(get(port, page)["x-cache"]).to eq("hit")
    stop(thrust)
    thrust, port = start_thrust_with_puma(env: { "LOG_REQUESTS" => "false", "STORAGE_PATH" => storage })
    expect(get(port, page)["x-cache"]).to eq("hit") # from disk
    answer = purge_through_app(port, "https://example.com/cache/local.html?#{public_cc}&type=text/html")
    expect(JSON.parse(answer.body)).to include("shared" => nil)
    expect(get(port, page)["x-cache"]).to eq("miss")
    expect(get(port, page)["x-cache"]).to eq("hit")
    # Stored again after the purge: the next process serves that copy.
    stop(thrust)
    thrust, port = start_thrust_with_puma(env: { "LOG_REQUESTS" => "false", "STORAGE_PATH" => storage })
    expect(get(port, page)["x-cache"]).to eq("hit")
    purge_through_app(port, "*")
    stop(thrust)
    # A purge made just before a stop holds after the restart.
    thrust, port = start_thrust_with_puma(env: { "LOG_REQUESTS" => "false", "STORAGE_PATH" => storage })
    expect(get(port, page)["x-cache"]).to eq("miss")
    stop(thrust)
  end

  it "drops another release's pages and keeps its immutable assets (disk and Redis)" do
    _redis, redis_port = start_redis
    v1, v1_port = start(redis_port, "CACHE_RELEASE" => "v1")
    page = "/cache/home.html?#{public_cc}&type=text/html"
    asset = "/cache/app-0123abcd.css?cc=public,+max-age%3D31536000,+immutable"
    [page, asset].each { |p| expect(get(v1_port, p)["x-cache"]).to eq("miss") }
    wait_until(message: "both entries in Redis") { redis_entries(redis_port) == 2 }
    stop(v1)

    # The next release on the same disk: v1's page is dropped from disk and
    # from Redis (its own app answers), its immutable asset is served.
    v2, v2_port = start(redis_port, "CACHE_RELEASE" => "v2", "STORAGE_PATH" => v1.storage_path)
    expect(get(v2_port, page)["x-cache"]).to eq("miss")
    expect(get(v2_port, asset)["x-cache"]).to eq("hit")
    expect(hits(v2_port, "/cache/app-0123abcd.css")).to eq(0)
    # A fresh instance of v2 with only Redis: v1's immutable asset.
    other, other_port = start(redis_port, "CACHE_RELEASE" => "v2")
    expect(get(other_port, asset)["x-cache"]).to eq("hit")
    expect(hits(other_port, "/cache/app-0123abcd.css")).to eq(0)
    [v2, other].each { |t| stop(t) }
  end

  it "refuses a bad CACHE_REDIS_URL at start, naming the setting" do
    thrust = ChildProcess.start({ "HTTP_PORT" => "0", "TARGET_PORT" => free_port.to_s,
                                  "CACHE_REDIS_URL" => "redis://:secret@/0" }, thrust_path, "true")
    expect(thrust.wait(timeout: 20).exitstatus).to eq(2)
    expect(thrust.output).to include("CACHE_REDIS_URL")
    expect(thrust.output).not_to include("secret")
  end

  it "answers the admin listener only with the token, on loopback" do
    thrust, port = start_thrust_with_puma(env: { "LOG_REQUESTS" => "false" })
    admin = Integer(thrust.wait_for_output(/"msg":"Server started".*"admin":"127\.0\.0\.1:(\d+)"/)[1])
    post = lambda do |body, headers = {}|
      Net::HTTP.start("127.0.0.1", admin) { |http| http.post("/purge", body, headers) }
    end
    expect(post.call("/x").code).to eq("401")
    expect(post.call("/x", "Authorization" => "Bearer wrong").code).to eq("401")
    expect(Net::HTTP.get_response(URI("http://127.0.0.1:#{admin}/purge")).code).to eq("405")
    listening = `ss -Hltn 'sport = :#{admin}'`
    expect(listening).to include("127.0.0.1:#{admin}")
    expect(listening).not_to include("*:#{admin}")
    bad = identity_request(port, "/purge?target=posts")
    expect([bad.code, bad.body]).to match([eq("500"), include("cannot purge \"posts\"")])
    stop(thrust)
  end

  it "raises Thruster::PurgeError with a clear message when no proxy can be reached" do
    require_relative "../lib/thruster/purge"
    saved = ENV.to_h.slice(Thruster::ADMIN_URL_ENV, Thruster::ADMIN_TOKEN_ENV)
    ENV.delete(Thruster::ADMIN_URL_ENV)
    expect { Thruster.purge("/x") }.to raise_error(Thruster::PurgeError, /THRUSTER_RS_ADMIN_URL is not set/)
    ENV[Thruster::ADMIN_URL_ENV] = "http://127.0.0.1:#{free_port}"
    ENV[Thruster::ADMIN_TOKEN_ENV] = "t" * 64
    expect { Thruster.purge("/x", timeout: 2) }.to raise_error(Thruster::PurgeError, /could not reach/)
  ensure
    ENV.delete(Thruster::ADMIN_URL_ENV)
    ENV.delete(Thruster::ADMIN_TOKEN_ENV)
    saved&.each { |k, v| ENV[k] = v }
  end
end
