# frozen_string_literal: true

require "spec_helper"
require "net/http"
require "securerandom"
require "open3"

# Prometheus metrics on METRICS_PORT through `thrust`, against a real Puma.
RSpec.describe "metrics" do
  public_cc = "cc=public,+max-age%3D60"

  def scrape(port)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 5, read_timeout: 10) { |http| http.get("/metrics") }
  end

  # {"name{labels}" => value} of every sample line.
  def samples(port)
    scrape(port).body.lines.reject { |l| l.start_with?("#") }.to_h do |line|
      key, value = line.rpartition(" ").values_at(0, 2)
      [key, Float(value)]
    end
  end

  def delta(before, after, key)
    after.fetch(key, 0.0) - before.fetch(key, 0.0)
  end

  def start_with_metrics(env = {})
    metrics_port = free_port
    thrust, port = start_thrust_with_puma(env: { "METRICS_PORT" => metrics_port.to_s }.merge(env))
    [thrust, port, metrics_port]
  end

  def upgrade_and_close(port)
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" \
                 "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    head = +""
    head << socket.readpartial(1) until head.end_with?("\r\n\r\n")
    expect(head).to start_with("HTTP/1.1 101")
  ensure
    socket&.close
  end

  it "answers on METRICS_PORT only: /metrics on HTTP_PORT reaches the app, other paths are 404" do
    _thrust, port, metrics_port = start_with_metrics
    response = scrape(metrics_port)
    expect(response.code).to eq("200")
    expect(response["content-type"]).to eq("text/plain; version=0.0.4")
    expect(response.body).to include("# TYPE thruster_http_requests_total counter")
    expect(response.body).to include("# TYPE thruster_http_request_duration_seconds histogram")
    expect(response.body).to include("process_resident_memory_bytes")

    app = http_get(port, "/metrics")
    expect(JSON.parse(app.body)).to include("path" => "/metrics")
    expect(http_get(metrics_port, "/").code).to eq("404")
    expect(http_get(metrics_port, "/metrics/x").code).to eq("404")
  end

  it "counts mixed traffic exactly and passes promtool check metrics" do
    _thrust, port, metrics_port = start_with_metrics("H2C_ENABLED" => "true")
    before = samples(metrics_port)

    expect(identity_request(port, "/cache/m.css?#{public_cc}")["x-cache"]).to eq("miss")
    expect(identity_request(port, "/cache/m.css?#{public_cc}")["x-cache"]).to eq("hit")
    expect(identity_request(port, "/cache/nf.css?status=404").code).to eq("404")
    expect(http_get(port, "/hang-up").code).to eq("502")
    upgrade_and_close(port)
    3.times do
      out = IO.popen(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                      "http://127.0.0.1:#{port}/up"], &:read)
      expect(out).to eq("2 200")
    end
    post = identity_request(port, "/echo", method: Net::HTTP::Post)
    expect(post.code).to eq("200")

    requests = ->(method, status) { %(thruster_http_requests_total{method="#{method}",status="#{status}"}) }
    # The upgrade is counted when its tunnel closes, a moment after the client closed.
    after = wait_until(message: "the 101 counted") do
      s = samples(metrics_port)
      s if delta(before, s, requests["GET", 101]) == 1
    end
    expect(delta(before, after, requests["GET", 200])).to eq(5) # miss, hit, 3 × h2
    expect(delta(before, after, requests["GET", 404])).to eq(1)
    expect(delta(before, after, requests["GET", 502])).to eq(1)
    expect(delta(before, after, requests["POST", 200])).to eq(1)
    expect(delta(before, after, "thruster_http_request_duration_seconds_count")).to eq(9)
    expect(delta(before, after, 'thruster_cache_requests_total{result="hit"}')).to eq(1)
    expect(delta(before, after, 'thruster_cache_requests_total{result="miss"}')).to be >= 1
    expect(delta(before, after, 'thruster_upstream_errors_total{kind="reset"}')).to eq(1)
    expect(after['thruster_cache_entries{tier="memory"}']).to be >= 1
    expect(after['thruster_cache_bytes{tier="memory"}']).to be >= 4000
    # The disk tier writes in the background: its gauge follows once the entry is on disk.
    wait_until(message: "the disk tier's gauge") do
      samples(metrics_port)['thruster_cache_entries{tier="disk"}'].to_i >= 1
    end
    expect(after["thruster_http_response_bytes_total"]).to be > 4000
    expect(after["thruster_upstream_response_duration_seconds_count"]).to be >= 6
    expect(after).to have_key('thruster_connections_open{protocol="h2"}')

    out, status = Open3.capture2e("promtool", "check", "metrics", stdin_data: scrape(metrics_port).body)
    expect(status).to be_success, out
  end

  it "counts connections closed by MAX_CONNECTIONS_PER_IP and bytes spooled by buffering" do
    env = { "MAX_CONNECTIONS_PER_IP" => "1", "REQUEST_BUFFER_MEMORY" => "1024" }
    _thrust, port, metrics_port = start_with_metrics(env)
    before = samples(metrics_port)
    held = TCPSocket.new("127.0.0.1", port)
    wait_until(message: "the held connection open") do
      samples(metrics_port)['thruster_connections_open{protocol="h1"}'] == 1
    end
    2.times do
      excess = TCPSocket.new("127.0.0.1", port)
      expect(excess.wait_readable(5)).to be_truthy
      expect(excess.read).to eq("")
      excess.close
    end
    held.close
    wait_until(message: "the held connection closed") do
      samples(metrics_port)['thruster_connections_open{protocol="h1"}'].zero?
    end

    body = "x" * 100_000
    response = Net::HTTP.start("127.0.0.1", port) { |http| http.post("/digest", body) }
    expect(response.body).to start_with("100000 ")
    after = samples(metrics_port)
    expect(delta(before, after, "thruster_connections_per_ip_limit_closed_total")).to eq(2)
    expect(delta(before, after, 'thruster_buffer_spooled_bytes_total{direction="request"}')).to eq(100_000)
  end

  describe "TLS" do
    let(:storage) { Dir.mktmpdir("thruster-metrics-tls") }

    def start_tls(env)
      metrics_port = free_port
      thrust = ChildProcess.start(
        { "HTTP_PORT" => "0", "HTTPS_PORT" => "0", "TARGET_PORT" => free_port.to_s, "STORAGE_PATH" => storage,
          "METRICS_PORT" => metrics_port.to_s }.merge(env),
        thrust_path, "puma", "-C", File.join(FIXTURES, "puma.rb"), File.join(FIXTURES, "app.ru")
      )
      [thrust, metrics_port]
    end

    it "exposes the served certificate's expiry" do
      thrust, metrics_port = start_tls("TLS_LOCAL" => "1")
      thrust.https_port
      expiry = samples(metrics_port)['thruster_tls_certificate_expiry_timestamp_seconds{domain="*"}']
      expect(expiry).to be > Time.now.to_f
    end

    it "counts failed ACME orders" do
      thrust, metrics_port = start_tls("TLS_DOMAIN" => "app.example.test",
                                       "ACME_DIRECTORY" => "https://127.0.0.1:#{free_port}/dir")
      thrust.wait_for_output(/"msg":"TLS: certificate issuance failed; will retry"/)
      after = wait_until(message: "the failure counted") do
        s = samples(metrics_port)
        s if s['thruster_acme_orders_total{kind="issue",result="failure"}'] == 1
      end
      expect(after['thruster_acme_orders_total{kind="issue",result="success"}']).to eq(0)
    end
  end

  describe "in-process (metrics_port:)" do
    let(:app_dir) { Dir.mktmpdir("thruster-metrics-inproc") }

    # Inodes of the TCP sockets on `port` (listener and accepted connections).

    it "serves metrics from the Puma master; workers hold no copy of its sockets" do
      port = free_port
      metrics_port = free_port
      env = { "APP_DIR" => app_dir, "PORT" => port.to_s, "WORKERS" => "2", "PRELOAD" => "0", "FORK_WORKER" => "0",
              "RUBYLIB" => File.join(ROOT, "lib"), "THRUSTER_OPTIONS" => JSON.generate(metrics_port:),
              "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }
      ChildProcess.start(env, RbConfig.ruby, Gem.bin_path("puma", "puma"),
                         "-C", File.join(FIXTURES, "puma_plugin.rb"), File.join(FIXTURES, "app.ru"))
      wait_for_ok(port, message: "Puma with the in-process proxy")
      master = Integer(File.read(File.join(app_dir, "puma.pid")))
      workers = wait_until(timeout: 20, message: "two workers") do
        pids = File.read("/proc/#{master}/task/#{master}/children").split.map(&:to_i)
        pids if pids.size == 2
      end
      before = samples(metrics_port)
      3.times { expect(http_get(port, "/up").code).to eq("200") }
      after = samples(metrics_port)
      expect(delta(before, after, 'thruster_http_requests_total{method="GET",status="200"}')).to eq(3)
      # A scrape connection is open while we look.
      Net::HTTP.start("127.0.0.1", metrics_port) do |http|
        http.get("/metrics")
        inodes = tcp_inodes(metrics_port)
        expect(socket_inodes_of(master)).to include(*inodes)
        workers.each { |pid| expect(socket_inodes_of(pid) & inodes).to be_empty }
      end
    end
  end

  it "keeps the number of series bounded under a flood of random methods and paths" do
    _thrust, port, metrics_port = start_with_metrics
    count_series = -> { scrape(metrics_port).body.lines.count { |l| !l.start_with?("#") } }
    warm = Net::HTTPGenericRequest.new("XWARM", false, true, "/warm")
    Net::HTTP.start("127.0.0.1", port) { |http| http.request(warm) }
    before_series = count_series.call
    before = samples(metrics_port)
    Net::HTTP.start("127.0.0.1", port) do |http|
      200.times do
        method = "X#{SecureRandom.alphanumeric(8).upcase}"
        http.request(Net::HTTPGenericRequest.new(method, false, true, "/#{SecureRandom.hex(8)}"))
      end
    end
    after = samples(metrics_port)
    expect(delta(before, after, 'thruster_http_requests_total{method="other",status="200"}')).to eq(200)
    expect(count_series.call).to eq(before_series)
  end
end
