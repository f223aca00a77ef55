# frozen_string_literal: true

require "spec_helper"
require "open3"
require "base64"
require "zlib"
require "digest"

H3_PYTHON = File.join(ROOT, ".venv-h3/bin/python")
H3_CLIENT = File.join(__dir__, "support/h3_client.py")

# HTTP/3 on the TLS port against real Puma, with aioquic as the client
# (spec/support/h3_client.py, in the .venv-h3 bin/setup makes).
RSpec.describe "HTTP/3" do
  let(:storage) { Dir.mktmpdir("thruster-h3") }
  let(:ca) { File.join(storage, "local-cert.pem") }

  before do
    # A failure, not a skip: a missing client must not pass for a working server.
    raise "#{H3_PYTHON} is missing: run bin/setup (it installs aioquic there)" unless File.executable?(H3_PYTHON)
  end

  # Sends `requests` (hashes: method, path, headers, body_file) on one QUIC
  # connection; returns the client's JSON report.
  def h3(port, *requests, timeout: 10, flood: nil)
    args = [H3_PYTHON, H3_CLIENT, "--port", port.to_s, "--cafile", ca, "--timeout", timeout.to_s]
    args += ["--flood", flood.to_s] if flood
    out, err, status = Open3.capture3(*args, *requests.map { |r| JSON.generate(r) })
    raise "h3 client failed (#{status}): #{err}" unless status.success?

    JSON.parse(out)
  end

  def body_of(response) = Base64.decode64(response["body_b64"])

  def header(response, name)
    response["headers"].find { |n, _| n == name }&.last
  end

  # [http_version, alt-svc] of an HTTPS request with curl over TCP.
  def curl_alt_svc(port, *args)
    out, = Open3.capture2("curl", "-sS", "--max-time", "10", "--cacert", ca, "-o", "/dev/null",
                          "--resolve", "localhost:#{port}:127.0.0.1", *args,
                          "-w", "%{http_version} %header{alt-svc}", "https://localhost:#{port}/up",
                          err: File::NULL)
    version, alt_svc = out.split(" ", 2)
    [version, alt_svc.to_s]
  end

  # Inodes of the UDP sockets bound to `port`.
  def udp_inodes(port)
    hex = format("%04X", port)
    %w[/proc/net/udp /proc/net/udp6].flat_map do |table|
      File.readlines(table).drop(1).filter_map do |line|
        fields = line.split
        fields[9] if fields[1].end_with?(":#{hex}")
      end
    end
  end

  def start_thrust(env = {})
    thrust = ChildProcess.start(
      { "HTTP_PORT" => "0", "HTTPS_PORT" => "0", "TARGET_PORT" => free_port.to_s, "STORAGE_PATH" => storage,
        "TLS_LOCAL" => "1" }.merge(env),
      thrust_path, "puma", "-C", File.join(FIXTURES, "puma.rb"), File.join(FIXTURES, "app.ru")
    )
    port = thrust.https_port
    wait_until(timeout: 20, message: "HTTPS through the proxy") { curl_alt_svc(port).first == "2" }
    [thrust, port]
  end

  describe "under thrust" do
    it "proxies GET to Puma as HTTP/1.1 with X-Forwarded-Proto https, logs HTTP/3.0, and takes a 100 KB POST whole" do
      thrust, port = start_thrust
      upload = File.join(storage, "upload.bin")
      File.binwrite(upload, Random.new(7).bytes(100 * 1024))
      report = h3(port, { path: "/echo?x=1", headers: { "user-agent" => "h3-spec" } },
                  { method: "POST", path: "/digest", body_file: upload })
      expect(report).to include("connected" => true, "max_streams_bidi" => 250)
      get, post = report["responses"]
      expect(get["status"]).to eq(200)
      seen = JSON.parse(body_of(get))
      expect(seen).to include("method" => "GET", "path" => "/echo", "query" => "x=1")
      expect(seen["headers"]).to include("HTTP_X_FORWARDED_PROTO" => "https", "HTTP_HOST" => "localhost:#{port}",
                                         "HTTP_VERSION" => "HTTP/1.1")
      expect(post["status"]).to eq(200)
      expect(body_of(post)).to eq("102400 #{Digest::SHA256.file(upload).hexdigest}")
      line = wait_until(message: "the request log line") do
        thrust.log_lines.find { |l| l["path"] == "/echo" }
      end
      expect(line).to include("proto" => "HTTP/3.0", "status" => 200, "user_agent" => "h3-spec")
    end

    it "serves a cached asset: a miss, then a hit whose gzip decodes to the original" do
      _thrust, port = start_thrust
      path = "/cache/h3.css?cc=public,max-age=60&size=100000"
      miss, = h3(port, { path:, headers: { "accept-encoding" => "gzip" } })["responses"]
      hit, = h3(port, { path:, headers: { "accept-encoding" => "gzip" } })["responses"]
      identity, = h3(port, { path:, headers: { "accept-encoding" => "identity" } })["responses"]
      expect([miss, hit, identity].map { |r| r["status"] }).to eq([200, 200, 200])
      expect(header(miss, "x-cache")).to eq("miss")
      expect(header(hit, "x-cache")).to eq("hit")
      expect(header(hit, "content-encoding")).to eq("gzip")
      original = body_of(identity)
      expect(original.bytesize).to eq(100_000)
      expect(Zlib.gunzip(body_of(hit))).to eq(original)
      expect(Zlib.gunzip(body_of(miss))).to eq(original)
    end

    it "serves an X-Sendfile response by reading the file (no sendfile(2) on UDP)" do
      _thrust, port = start_thrust
      file = File.join(File.realpath(storage), "data.bin")
      data = Random.new(11).bytes(300_000)
      File.binwrite(file, data)
      response, = h3(port, { path: "/sendfile?path=#{URI.encode_www_form_component(file)}" })["responses"]
      expect(response["status"]).to eq(200)
      expect(header(response, "content-length")).to eq(data.bytesize.to_s)
      expect(header(response, "x-sendfile")).to be_nil
      expect(body_of(response).b).to eq(data)
    end

    it "answers 20 concurrent streams on one connection" do
      _thrust, port = start_thrust
      requests = Array.new(20) { |i| { path: "/cache/c#{i}.css?size=#{1000 + i}" } }
      report = h3(port, *requests)
      expect(report["responses"].map { |r| r["status"] }).to eq([200] * 20)
      expect(report["responses"].map { |r| body_of(r).bytesize }).to eq(Array.new(20) { |i| 1000 + i })
    end

    it "advertises HTTP/3 with Alt-Svc on HTTP/1.1 and HTTP/2 responses" do
      _thrust, port = start_thrust
      expect(curl_alt_svc(port, "--http2")).to eq(["2", %(h3=":#{port}"; ma=86400)])
      expect(curl_alt_svc(port, "--http1.1")).to eq(["1.1", %(h3=":#{port}"; ma=86400)])
    end

    it "with HTTP3_ENABLED=false: no QUIC answer, no Alt-Svc, no UDP socket" do
      thrust, port = start_thrust("HTTP3_ENABLED" => "false")
      expect(curl_alt_svc(port, "--http2")).to eq(["2", ""])
      expect(curl_alt_svc(port, "--http1.1")).to eq(["1.1", ""])
      expect(h3(port, { path: "/up" }, timeout: 2)).to include("connected" => false)
      expect(thrust.output).to include('"http3":false')
      expect(udp_inodes(port)).to be_empty
    end

    it "serves other clients while one holds every stream it may, and closes it when it floods beyond" do
      _thrust, port = start_thrust
      args = [H3_PYTHON, H3_CLIENT, "--port", port.to_s, "--cafile", ca, "--flood", "400", "--hold", "30"]
      Open3.popen3(*args) do |stdin, stdout, _stderr, flooder|
        stdin.close
        # 250 request streams open, their bodies never coming.
        expect(JSON.parse(stdout.gets)).to eq("holding" => 250)
        report = h3(port, { path: "/up" }, { path: "/echo" })
        expect(report["responses"].map { |r| r["status"] }).to eq([200, 200])
        expect(body_of(report["responses"].first)).to eq("up")
        # The flooder goes past the limit after its hold; end the hold now.
        Process.kill("USR1", flooder.pid)
        # STREAM_LIMIT_ERROR (RFC 9000 §20.1).
        expect(JSON.parse(stdout.read)).to include("connected" => true, "closed" => true, "error_code" => 4)
      end
      expect(h3(port, { path: "/up" })["responses"].first).to include("status" => 200)
    end
  end

  describe "in-process (Puma plugin)" do
    def start_puma(https, workers:, options: {})
      port = free_port
      app_dir = Dir.mktmpdir("thruster-h3-inproc")
      options = { tls_local: true, https_port: https, https_bind: "127.0.0.1:#{https}", storage_path: storage }
                .merge(options)
      env = { "APP_DIR" => app_dir, "PORT" => port.to_s, "WORKERS" => workers.to_s,
              "RUBYLIB" => File.join(ROOT, "lib"), "THRUSTER_OPTIONS" => JSON.generate(options),
              # As in in_process_spec: Puma 5.6 hot-restarts only without Bundler.
              "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }
      puma = ChildProcess.start(env, RbConfig.ruby, Gem.bin_path("puma", "puma"),
                                "-C", File.join(FIXTURES, "puma_plugin.rb"), File.join(FIXTURES, "app.ru"))
      wait_until(timeout: 20, message: "the local certificate") { File.exist?(ca) }
      wait_until(timeout: 20, message: "HTTPS through the proxy") { curl_alt_svc(https).first == "2" }
      [puma, File.join(app_dir, "puma.pid")]
    end

    it "serves HTTP/3 from the Puma master; workers hold no UDP socket of the proxy; USR2 hands the socket over" do
      https = free_port
      puma, pidfile = start_puma(https, workers: 2)
      master = Integer(File.read(pidfile))
      workers = wait_until(timeout: 20, message: "both workers") do
        pids = File.read("/proc/#{master}/task/#{master}/children").split.map(&:to_i)
        pids if pids.size == 2
      end
      expect(h3(https, { path: "/up" })["responses"].first).to include("status" => 200)
      udp = udp_inodes(https)
      expect(udp.size).to eq(1)
      expect(socket_inodes_of(master)).to include(*udp)
      workers.each { |pid| expect(socket_inodes_of(pid) & udp).to be_empty }

      puma.signal("USR2")
      wait_until(timeout: 30, message: "proxy restarted") { puma.output.scan("thruster-rs: proxy on").size == 2 }
      wait_until(timeout: 20, message: "HTTP/3 after the restart") do
        h3(https, { path: "/up" }, timeout: 3)["responses"]&.first&.dig("status") == 200
      end
      # The same socket, handed over across exec rather than bound anew.
      expect(udp_inodes(https)).to eq(udp)
    end

    it "with http3_enabled: false opens no UDP socket and sends no Alt-Svc" do
      https = free_port
      start_puma(https, workers: 0, options: { http3_enabled: false })
      expect(curl_alt_svc(https, "--http2")).to eq(["2", ""])
      expect(udp_inodes(https)).to be_empty
      expect(h3(https, { path: "/up" }, timeout: 2)).to include("connected" => false)
    end
  end
end
