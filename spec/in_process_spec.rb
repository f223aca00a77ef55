# frozen_string_literal: true

require "spec_helper"

# The proxy inside the Puma master (`plugin :thruster_rs`), against real Puma.
RSpec.describe "in-process mode (Puma plugin)" do
  let(:app_dir) { Dir.mktmpdir("thruster-inproc") }

  def start_puma(workers: 0, preload: false, fork_worker: false, options: {})
    port = free_port
    env = { "APP_DIR" => app_dir, "PORT" => port.to_s, "WORKERS" => workers.to_s,
            "PRELOAD" => preload ? "1" : "0", "FORK_WORKER" => fork_worker ? "1" : "0",
            # On a hot restart Puma re-execs itself without our -I; RUBYLIB survives.
            "RUBYLIB" => File.join(ROOT, "lib"), "THRUSTER_OPTIONS" => JSON.generate(options),
            # Puma 5.6 cannot hot-restart under Debian's Bundler (Bundler::ORIGINAL_ENV
            # is missing after the exec, with or without this plugin): run it bare.
            "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }
    puma = ChildProcess.start(env, RbConfig.ruby, Gem.bin_path("puma", "puma"),
                              "-C", File.join(FIXTURES, "puma_plugin.rb"), File.join(FIXTURES, "app.ru"))
    wait_for_ok(port, message: "Puma with the in-process proxy")
    [puma, port]
  end

  def pid_of(path) = Integer(File.read(path))

  def worker_pids(master)
    File.read("/proc/#{master}/task/#{master}/children").split.map(&:to_i)
  rescue Errno::ENOENT
    []
  end

  def port_free?(port)
    TCPServer.new("127.0.0.1", port).close
    true
  rescue Errno::EADDRINUSE
    false
  end

  # Requests /h in a loop on fresh connections until stopped; returns the
  # status codes (or exception class names).
  def traffic(port)
    stop = false
    results = []
    thread = Thread.new do
      until stop
        results << begin
          http_get(port, "/h").code
        rescue StandardError => e
          e.class.name
        end
      end
    end
    [-> { (stop = true) && thread.join && results }, results]
  end

  it "serves through the proxy in single mode, with Puma moved to a private Unix socket" do
    puma, port = start_puma
    seen = JSON.parse(http_get(port, "/h").body)
    expect(seen["headers"]).to include("HTTP_X_FORWARDED_FOR" => "127.0.0.1", "HTTP_X_REQUEST_START" => /\At=\d+/)
    socket = File.join(app_dir, "tmp/sockets/thruster-puma.sock")
    expect(File.socket?(socket)).to be(true)
    expect(File.stat(socket).mode & 0o777).to eq(0o600)
    expect(puma.output).to include("thruster-rs: proxy on 127.0.0.1:#{port} -> unix:#{socket}")
    expect(puma.output).to include("Listening on unix://#{socket}")
    wait_until(message: "request log") { puma.log_lines.any? { |l| l["msg"] == "Request" && l["path"] == "/h" } }
  end

  it "sends Puma no more requests at once than its threads (workers x max threads), the rest wait in the proxy" do
    metrics_port = free_port
    puma, port = start_puma(workers: 2, options: { metrics_port: })
    # puma_plugin.rb: threads 1, 4 in each of 2 workers.
    expect(puma.output).to include("thruster-rs: at most 8 requests at once to Puma (UPSTREAM_MAX_CONNECTIONS)")
    waiting = lambda do
      body = Net::HTTP.get(URI("http://127.0.0.1:#{metrics_port}/metrics"))
      Float(body[/^thruster_upstream_waiting_requests (\S+)$/, 1])
    end
    expect(waiting.call).to eq(0)
    # Distinct URLs: identical concurrent misses would be coalesced by the cache.
    requests = Array.new(12) { |i| Thread.new { http_get(port, "/slow?s=1.5&i=#{i}") } }
    wait_until(timeout: 10, message: "4 requests waiting for a slot") { waiting.call == 4 }
    expect(requests.map { |t| [t.value.code, t.value.body] }.uniq).to eq([["200", "slow done"]])
    expect(waiting.call).to eq(0)
  end

  [false, true].each do |preload|
    it "serves through the proxy with 2 workers (preload_app! #{preload ? 'on' : 'off'}) and stops on TERM" do
      puma, port = start_puma(workers: 2, preload:)
      pids = Array.new(20) { JSON.parse(http_get(port, "/h").body)["pid"] }
      master = pid_of(File.join(app_dir, "puma.pid"))
      expect(pids - worker_pids(master)).to be_empty
      started = monotonic
      puma.signal("TERM")
      expect(puma.wait(timeout: 15).exitstatus).to eq(0).or be_nil
      expect(monotonic - started).to be < 10
      expect(port_free?(port)).to be(true)
    end
  end

  [0, 2].each do |workers|
    it "finishes an in-flight request on TERM (#{workers.zero? ? 'single' : 'cluster'} mode)" do
      puma, port = start_puma(workers:)
      slow = Thread.new { http_get(port, "/slow?s=1.5") }
      puma.wait_for_output(/slow request started/)
      puma.signal("TERM")
      expect(slow.value.code).to eq("200")
      expect(slow.value.body).to eq("slow done")
      puma.wait(timeout: 15)
      expect(port_free?(port)).to be(true)
    end
  end

  it "keeps its disk cache across a Puma restart: Thruster.stop writes pending entries, the new master hits" do
    storage = File.join(app_dir, "shared-storage")
    path = "/cache/inproc.css?cc=public,+max-age%3D600&size=30000"
    # A fixed Host: the new Puma listens on another port, part of the key.
    get = ->(port) { identity_request(port, path, headers: { "Host" => "inproc.test" }) }
    puma, port = start_puma(options: { storage_path: storage })
    first = get.call(port)
    expect(first["x-cache"]).to eq("miss")
    puma.signal("TERM")
    puma.wait(timeout: 15)
    expect(Dir.glob(File.join(storage, "cache", "*", "*", "*")).size).to eq(2) # the entry and its vary record

    _puma, port = start_puma(options: { storage_path: storage })
    again = get.call(port)
    expect([again["x-cache"], again.body == first.body]).to eq(["hit", true])
    expect(identity_request(port, "/hits?path=/cache/inproc.css").body).to eq("0")
  end

  it "stops promptly on INT with the port freed" do
    puma, port = start_puma(workers: 2)
    puma.signal("INT")
    puma.wait(timeout: 15)
    expect(port_free?(port)).to be(true)
  end

  it "loses no request during a phased restart (USR1) under continuous traffic" do
    puma, port = start_puma(workers: 2)
    finish, results = traffic(port)
    wait_until(message: "traffic") { results.size > 20 }
    puma.signal("USR1")
    wait_until(timeout: 30, message: "both workers replaced") { puma.output.scan(/booted in .*phase: 1/).size == 2 }
    codes = finish.call
    expect(codes.size).to be > 50
    expect(codes.uniq).to eq(["200"])
  end

  it "re-execs on USR2 without refusing or failing a request, keeping the listener" do
    puma, port = start_puma(workers: 2)
    finish, results = traffic(port)
    wait_until(message: "traffic") { results.size > 20 }
    puma.signal("USR2")
    wait_until(timeout: 30, message: "proxy restarted") { puma.output.scan("thruster-rs: proxy on").size == 2 }
    wait_until(timeout: 30, message: "new workers") { puma.output.scan(/Worker \d \(PID: \d+\) booted/).size >= 4 }
    count = results.size
    wait_until(message: "traffic after the restart") { results.size > count + 20 }
    codes = finish.call
    expect(puma.output).to include("handing the proxy's listeners over")
    expect(codes.uniq).to eq(["200"])
    # The admin listener was handed over too: the new workers' Thruster.purge
    # reaches it at the same URL, with the same token.
    admins = puma.output.scan(/"msg":"Server started".*"admin":"(127\.0\.0\.1:\d+)"/).flatten
    expect(admins.size).to eq(2)
    expect(admins.uniq.size).to eq(1), puma.output.lines.grep(/handing|Server started/).join
    purged = http_get(port, "/purge?target=/after-restart")
    expect([purged.code, JSON.parse(purged.body)["purged"]]).to eq(["200", "/after-restart"])
  end

  it "works with fork_worker: workers forked from worker 0 serve and hold no proxy socket" do
    puma, port = start_puma(workers: 2, fork_worker: true)
    booted = wait_until(timeout: 20, message: "both workers") do
      found = puma.output.scan(/Worker (\d) \(PID: (\d+)\) booted/).to_h
      found if found.size == 2
    end
    worker0, worker1 = booted.values_at("0", "1").map(&:to_i)
    expect(File.read("/proc/#{worker1}/stat").split(")").last.split[1].to_i).to eq(worker0)
    expect(Array.new(10) { http_get(port, "/h").code }.uniq).to eq(["200"])
    expect(socket_inodes_of(worker1) & tcp_inodes(port)).to be_empty
    # Nor the admin listener, which Thruster.purge in a worker reaches.
    admin = Integer(puma.output[/"msg":"Server started".*"admin":"127\.0\.0\.1:(\d+)"/, 1])
    expect(tcp_inodes(admin)).not_to be_empty
    expect((socket_inodes_of(worker0) + socket_inodes_of(worker1)) & tcp_inodes(admin)).to be_empty
    purged = http_get(port, "/purge?target=/cache/*")
    expect([purged.code, JSON.parse(purged.body)]).to eq(["200", { "purged" => "/cache/*", "shared" => nil }])
  end

  it "survives kill -9 of a worker" do
    puma, port = start_puma(workers: 2)
    master = pid_of(File.join(app_dir, "puma.pid"))
    victim = worker_pids(master).first
    Process.kill("KILL", victim)
    wait_until(timeout: 20, message: "worker respawn") do
      pids = worker_pids(master)
      pids.size == 2 && !pids.include?(victim)
    end
    expect(Array.new(10) { http_get(port, "/h").code }.uniq).to eq(["200"])
    expect(puma.exited?).to be(false)
  end

  it "leaves no proxy socket in a worker forked while clients are connected; idle closes reach the client" do
    puma, port = start_puma(workers: 2, options: { http_idle_timeout: 2 })
    master = pid_of(File.join(app_dir, "puma.pid"))
    clients = Array.new(3) do
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
      response = +""
      response << socket.readpartial(4096) until response.end_with?("\r\n\r\nup")
      socket
    end
    proxy_inodes = tcp_inodes(port)
    expect(proxy_inodes.size).to be >= 4 # listener + 3 connections
    expect(socket_inodes_of(master)).to include(*proxy_inodes)

    victim = worker_pids(master).first
    Process.kill("KILL", victim)
    fresh = wait_until(timeout: 20, message: "a new worker") do
      (worker_pids(master) - [victim]).size == 2 && (worker_pids(master) - [victim]).last
    end
    wait_until(message: "new worker booted") { socket_inodes_of(fresh).any? }
    expect(socket_inodes_of(fresh) & proxy_inodes).to be_empty

    # The proxy closes the idle connections after 2 s; with no worker holding
    # a copy, each client sees EOF about then.
    clients.each do |socket|
      expect(socket.wait_readable(4)).to be_truthy
      expect { socket.readpartial(1) }.to raise_error(EOFError)
    end
  ensure
    clients&.each(&:close)
    puma&.signal("TERM")
  end

  it "releases the GVL while Thruster.stop waits for an in-flight request" do
    out = IO.popen({ "RUBYLIB" => File.join(ROOT, "lib") }, [RbConfig.ruby, File.join(FIXTURES, "gvl_ticks.rb")],
                   err: %i[child out], &:read)
    result = JSON.parse(out.lines.last)
    expect(result["status"]).to eq("200")
    expect(result["body"]).to eq("done")
    expect(result["waited"]).to be_between(0.5, 4.5)
    # ~1 s of waiting at one tick per 10 ms; with the GVL held there would be ~0.
    expect(result["ticks"]).to be > 30
    expect(result["running"]).to be(false)
  end

  it "stands aside under thrust, so requests are proxied once" do
    env = { "APP_DIR" => app_dir, "HTTP_PORT" => "0", "TARGET_PORT" => free_port.to_s,
            "RUBYLIB" => File.join(ROOT, "lib") }
    thrust = ChildProcess.start(env, thrust_path, RbConfig.ruby, Gem.bin_path("puma", "puma"),
                                "-C", File.join(FIXTURES, "puma_plugin.rb"), File.join(FIXTURES, "app.ru"))
    port = thrust.http_port
    response = wait_for_ok(port, "/h", message: "Puma behind thrust")
    expect(JSON.parse(response.body)["headers"]["HTTP_X_FORWARDED_FOR"]).to eq("127.0.0.1")
    expect(thrust.output).to include("running under `thrust`, so the plugin stands aside")
  end

  describe "Ruby API errors" do
    def ruby_eval(script)
      IO.popen({ "RUBYLIB" => File.join(ROOT, "lib") }, [RbConfig.ruby, "-e", script], err: %i[child out], &:read)
    end

    it "raises Thruster::ConfigError for an unknown keyword, naming the accepted ones" do
      out = ruby_eval('require "thruster"; begin; Thruster.start(upstream: "127.0.0.1:1", htp_port: 1); ' \
                      "rescue Thruster::ConfigError => e; print e.message; end")
      expect(out).to include(":htp_port", "http_port")
    end

    it "raises Thruster::ConfigError for a bad value, naming the keyword" do
      out = ruby_eval('require "thruster"; begin; Thruster.start(upstream: "127.0.0.1:1", http_port: "abc"); ' \
                      "rescue Thruster::ConfigError => e; print e.message; end")
      expect(out).to include("http_port", '"abc"', "TCP port")
    end

    it "raises Thruster::ConfigError for a bad upstream, naming the value and the accepted forms" do
      out = ruby_eval('require "thruster"; begin; Thruster.start(upstream: "localhost:3000"); ' \
                      "rescue Thruster::ConfigError => e; print e.message; end")
      expect(out).to include('invalid upstream "localhost:3000"', '"unix:/path/to.sock"', '"unix:///path/to.sock"',
                             '"IP:PORT"', '"[IPv6]:PORT"', "host names are not resolved")
    end

    it "refuses a Unix socket upstream without a path at start" do
      out = ruby_eval('require "thruster"; begin; Thruster.start(upstream: "unix:"); ' \
                      "rescue Thruster::ConfigError => e; print e.message; end")
      expect(out).to include('invalid upstream "unix:"', "path is empty")
    end

    it "raises Thruster::Error, not ConfigError, when the proxy already runs" do
      script = 'require "thruster"; Thruster.start(upstream: "127.0.0.1:1", http_port: 0, bind: nil); ' \
               'begin; Thruster.start(upstream: "127.0.0.1:1", http_port: 0, bind: nil); ' \
               "rescue Thruster::Error => e; print e.class, \": \", e.message; ensure; Thruster.stop; end"
      expect(ruby_eval(script)).to include("Thruster::Error: the proxy is already running")
    end

    it "lets keywords win over THRUSTER_X and X" do
      script = 'require "thruster"; ENV["THRUSTER_HTTP_PORT"] = "1"; ENV["HTTP_PORT"] = "2"; ' \
               'p Thruster.start(upstream: "127.0.0.1:1", http_port: 0, bind: nil); Thruster.stop'
      out = ruby_eval(script)
      expect(out).to match(/\["\[::\]:\d+"\]/)
      expect(out).not_to include(":1\"", ":2\"")
    end
  end
end
