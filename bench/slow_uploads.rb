# frozen_string_literal: true

# Process-based app servers under slow uploads: how much of its unloaded
# /hello rate a 4-worker app server keeps while CLIENTS clients each upload
# BODY bytes at RATE bytes/s, behind each proxy. Without request buffering a
# slow upload holds a worker for its whole duration, and 50 of them hold all
# four: the rate drops to ~0.
#
# Peers: Unicorn alone, `thrust` + Unicorn, nginx + Unicorn, Thruster (Go) +
# Unicorn when THRUSTER_GO_BIN is set; Puma with 4 single-threaded workers
# alone and with the in-process proxy (the other run mode). Servers on CPU 0,
# wrk and the uploaders on CPU 1. For each peer, REPEAT pairs of (unloaded,
# loaded) wrk runs; the ratio of medians is reported.
#
#   ruby bench/slow_uploads.rb                 # 50 clients, 10 KB at 100 B/s, 3 x 10 s
#   REPEAT=1 DURATION=5 ruby bench/slow_uploads.rb
#   PEERS=puma,inproc REPEAT=5 ruby bench/slow_uploads.rb   # some peers only
#                                                             # (unicorn thrust nginx puma inproc thruster-go)
#
# Writes bench/results/slow_uploads.md.

require "fileutils"
require "open3"
require "rbconfig"
require "socket"
require "tmpdir"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
THRUST = File.join(ROOT, "lib", "thruster", "thrust")
CLIENTS = Integer(ENV.fetch("CLIENTS", "50"))
BODY = Integer(ENV.fetch("BODY", "10240"))
RATE = Integer(ENV.fetch("RATE", "100"))
DURATION = Integer(ENV.fetch("DURATION", "10"))
REPEAT = Integer(ENV.fetch("REPEAT", "3"))
CONNS = Integer(ENV.fetch("CONNS", "8"))
SERVER_CPU = ENV.fetch("SERVER_CPU", "0")
CLIENT_CPU = ENV.fetch("CLIENT_CPU", "1")
UNICORN = ENV.fetch("UNICORN", "unicorn")
PUMA = Gem.bin_path("puma", "puma")
# Debian's unicorn and puma run outside Bundler.
PLAIN_ENV = { "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }.freeze

abort "bench/slow_uploads: #{THRUST} missing; run `bundle exec rake compile`" unless File.executable?(THRUST)
%w[wrk nginx taskset].each do |tool|
  abort "bench/slow_uploads: #{tool} missing (bin/setup installs it)" unless system("command -v #{tool} >/dev/null")
end

def pinned(cpu, *cmd) = ["taskset", "-c", cpu, *cmd]

APP = <<~RUBY
  run lambda { |env|
    if env["PATH_INFO"] == "/upload"
      body = env["rack.input"].read
      [200, { "content-type" => "text/plain" }, [body.bytesize.to_s]]
    else
      [200, { "content-type" => "text/plain", "content-length" => "13" }, ["Hello, world!"]]
    end
  }
RUBY

# One peer: how to start it, and the port clients use.
Peer = Struct.new(:name, :port, :pids, keyword_init: true)

def spawn_pinned(dir, name, env, argv)
  log = File.join(dir, "#{name}.log")
  Process.spawn(PLAIN_ENV.merge(env), *pinned(SERVER_CPU, *argv), out: log, err: log, pgroup: true)
end

def stop(peer)
  # Signal every group first, then reap: the peers stop in parallel.
  peer.pids.each { |pid| Process.kill("TERM", -pid) rescue nil } # rubocop:disable Style/RescueModifier
  peer.pids.each { |pid| Process.wait(pid) rescue nil } # rubocop:disable Style/RescueModifier,Style/CombinableLoops
end

def unicorn_conf(dir, port)
  path = File.join(dir, "unicorn-#{port}.rb")
  File.write(path, "worker_processes 4\nlisten \"127.0.0.1:#{port}\"\ntimeout 600\n")
  path
end

def start_unicorn(dir, app)
  port = BenchSupport.free_port
  pid = spawn_pinned(dir, "unicorn", {}, [UNICORN, "-c", unicorn_conf(dir, port), app])
  BenchSupport.wait_for(port)
  Peer.new(name: "unicorn", port:, pids: [pid])
end

def start_thrust(dir, app)
  port = BenchSupport.free_port
  target = BenchSupport.free_port
  conf = File.join(dir, "unicorn-thrust.rb")
  File.write(conf, "worker_processes 4\nlisten \"127.0.0.1:\#{ENV.fetch('PORT')}\"\ntimeout 600\n")
  env = { "HTTP_PORT" => port.to_s, "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false",
          "STORAGE_PATH" => File.join(dir, "storage-thrust") }
  pid = spawn_pinned(dir, "thrust", env, [THRUST, UNICORN, "-c", conf, app])
  BenchSupport.wait_for(port)
  Peer.new(name: "thruster-rs (thrust)", port:, pids: [pid])
end

def start_nginx(dir, app)
  unicorn = start_unicorn(dir, app)
  port = BenchSupport.free_port
  FileUtils.mkdir_p(File.join(dir, "nginx"))
  conf = File.join(dir, "nginx.conf")
  File.write(conf, <<~NGINX)
    worker_processes 1;
    daemon off;
    pid #{dir}/nginx/nginx.pid;
    error_log #{dir}/nginx-error.log warn;
    events { worker_connections 4096; }
    http {
      access_log off;
      client_body_temp_path #{dir}/nginx/body; proxy_temp_path #{dir}/nginx/proxy;
      fastcgi_temp_path #{dir}/nginx/fcgi; uwsgi_temp_path #{dir}/nginx/uwsgi; scgi_temp_path #{dir}/nginx/scgi;
      upstream app { server 127.0.0.1:#{unicorn.port}; }
      server {
        listen 127.0.0.1:#{port};
        location / { proxy_pass http://app; }
      }
    }
  NGINX
  pid = spawn_pinned(dir, "nginx", {}, ["nginx", "-c", conf, "-p", dir])
  BenchSupport.wait_for(port)
  Peer.new(name: "nginx", port:, pids: [pid, *unicorn.pids])
end

def start_thruster_go(dir, app, binary)
  unicorn = start_unicorn(dir, app)
  port = BenchSupport.free_port
  env = { "HTTP_PORT" => port.to_s, "TARGET_PORT" => unicorn.port.to_s, "STORAGE_PATH" => "#{dir}/go" }
  pid = spawn_pinned(dir, "thruster-go", env, [binary, "sleep", "86400"])
  BenchSupport.wait_for(port)
  Peer.new(name: "thruster-go", port:, pids: [pid, *unicorn.pids])
end

def start_puma(dir, app, plugin:)
  port = BenchSupport.free_port
  conf = File.join(dir, "puma-#{port}.rb")
  File.write(conf, <<~RUBY)
    directory #{dir.inspect}
    environment "production"
    workers 4
    threads 1, 1
    bind "tcp://127.0.0.1:#{port}"
    #{plugin ? "plugin :thruster_rs\nthruster_rs log_requests: false" : ''}
  RUBY
  env = plugin ? { "RUBYLIB" => File.join(ROOT, "lib"), "STORAGE_PATH" => File.join(dir, "storage-#{port}") } : {}
  pid = spawn_pinned(dir, plugin ? "inproc" : "puma", env, [RbConfig.ruby, PUMA, "-C", conf, app])
  BenchSupport.wait_for(port)
  Peer.new(name: plugin ? "thruster-rs in-process (Puma 4x1)" : "puma 4x1", port:, pids: [pid])
end

def wrk_rate(port)
  out, = Open3.capture2e(*pinned(CLIENT_CPU, "wrk", "-t1", "-c#{CONNS}", "-d#{DURATION}s",
                                 "http://127.0.0.1:#{port}/hello"))
  out[%r{Requests/sec:\s+([\d.]+)}, 1].to_f
end

# A child process (on the client CPU) holding CLIENTS uploads, each sending
# RATE/10 bytes every 100 ms; it prints "ready" once every request head is out.
UPLOADER = <<~RUBY
  require "socket"
  port, clients, body, rate = ARGV.map { |a| Integer(a) }
  sockets = Array.new(clients) do
    TCPSocket.new("127.0.0.1", port).tap do |s|
      s.write("POST /upload HTTP/1.1\\r\\nHost: b\\r\\nContent-Length: \#{body}\\r\\n" \\
              "Content-Type: application/octet-stream\\r\\nConnection: close\\r\\n\\r\\n")
    end
  end
  puts "ready"
  $stdout.flush
  sent = 0
  piece = "u" * [rate / 10, 1].max
  while sent < body
    sockets.each { |s| s.write(piece) rescue nil }
    sent += piece.bytesize
    sleep 0.1
  end
  sleep
RUBY

def with_uploads(port)
  io = IO.popen(pinned(CLIENT_CPU, RbConfig.ruby, "-e", UPLOADER, port.to_s, CLIENTS.to_s, BODY.to_s, RATE.to_s))
  raise "uploaders did not start" unless io.gets&.strip == "ready"

  sleep 1 # the first pieces reach whoever reads them
  yield
ensure
  if io
    Process.kill("KILL", io.pid) rescue nil # rubocop:disable Style/RescueModifier
    io.close
  end
end

def median(values) = values.sort[values.size / 2]

def time_wait_sockets = `ss -tanH state time-wait`.lines.size

# Unicorn closes every connection, so each request leaves a loopback socket
# in TIME_WAIT for 60 s, and connect(2) slows as they pile up towards the
# ephemeral port range. Each peer starts with few of them, and the order of
# unloaded and loaded runs alternates, so neither side always runs last.
def settle
  deadline = Time.now + 65
  sleep 1 while time_wait_sockets > 2000 && Time.now < deadline
end

def measure(peer)
  settle
  wrk_rate(peer.port) # warm-up
  pairs = Array.new(REPEAT) do |rep|
    runs = { unloaded: -> { wrk_rate(peer.port) }, loaded: -> { with_uploads(peer.port) { wrk_rate(peer.port) } } }
    order = rep.even? ? %i[unloaded loaded] : %i[loaded unloaded]
    got = order.to_h { |kind| [kind, runs[kind].call] }
    warn format("bench: %-36<name>s unloaded %8.0<u>f req/s, loaded %8.0<l>f req/s (%<tw>d in TIME_WAIT)",
                name: peer.name, u: got[:unloaded], l: got[:loaded], tw: time_wait_sockets)
    [got[:unloaded], got[:loaded]]
  end
  { unloaded: pairs.map(&:first), loaded: pairs.map(&:last) }
end

results = {}
Dir.mktmpdir("thruster-uploads") do |dir|
  app = File.join(dir, "app.ru")
  File.write(app, APP)
  starters = {
    "unicorn" => -> { start_unicorn(dir, app) },
    "thrust" => -> { start_thrust(dir, app) },
    "nginx" => -> { start_nginx(dir, app) },
    "puma" => -> { start_puma(dir, app, plugin: false) },
    "inproc" => -> { start_puma(dir, app, plugin: true) }
  }
  if (go = ENV.fetch("THRUSTER_GO_BIN", nil)) && File.executable?(go)
    starters["thruster-go"] = -> { start_thruster_go(dir, app, go) }
  end
  chosen = ENV.fetch("PEERS", starters.keys.join(",")).split(",")
  starters.slice(*chosen).each_value do |start|
    peer = start.call
    begin
      results[peer.name] = measure(peer)
    ensure
      stop(peer)
    end
  end
end

lines = []
lines << "# Slow uploads: #{CLIENTS} clients x #{BODY} B at #{RATE} B/s, 4 app workers"
lines << ""
lines << "#{Time.now.utc.strftime('%Y-%m-%d %H:%M UTC')}; wrk -c#{CONNS} #{DURATION} s on /hello (13 B), " \
         "median of #{REPEAT} (unloaded, loaded) pairs; " \
         "servers pinned to CPU #{SERVER_CPU}, clients to CPU #{CLIENT_CPU}."
lines << ""
lines << "| peer | unloaded req/s | under slow uploads req/s | kept (medians) | kept, pair by pair |"
lines << "|---|---|---|---|---|"
percent = ->(loaded, unloaded) { unloaded.positive? ? "#{(100.0 * loaded / unloaded).round}%" : "–" }
results.each do |name, r|
  unloaded = median(r[:unloaded])
  loaded = median(r[:loaded])
  pairs = r[:unloaded].zip(r[:loaded]).map { |u, l| percent.call(l, u) }
  lines << "| #{name} | #{unloaded.round} | #{loaded.round} | #{percent.call(loaded, unloaded)} | #{pairs.join(', ')} |"
end
report = lines.join("\n")
puts report
FileUtils.mkdir_p(File.join(ROOT, "bench", "results"))
File.write(File.join(ROOT, "bench", "results", "slow_uploads.md"), "#{report}\n")
