#!/usr/bin/env ruby
# frozen_string_literal: true

# Memory per idle keep-alive connection: the RSS growth of a server's
# process tree while IDLE_CONNS connections (default 1,000) are open and
# idle, each having made one request (GET /hello), divided by their number.
# Every measurement runs in a freshly started server (after a few requests
# that map in its request code, the same for every peer): in one that has run
# before, the allocator hands back memory it kept and the figure reads far
# lower (33.6 KiB first, then 10.6, 3.7, 1.4 in one run of `thrust`).
#
# Servers, in front of one Puma (the benchmark app): thruster-rs (`thrust`,
# settings as in bench/run: H2C_ENABLED, no request log), thruster-rs
# in-process (Puma with the plugin; h1 only), nginx (1 worker) and Caddy.
# Modes: h1 (cleartext HTTP/1.1), tls (HTTP/1.1 over TLS), h2 (HTTP/2 over
# TLS). REPEAT (default 1) fresh starts per server and mode; the median.
#
#   ruby bench/idle_connections.rb                 # prints a table
#   ruby bench/idle_connections.rb --json FILE     # also writes the figures (bench/run)
#   PEERS=thruster-rs,nginx MODES=h1 ruby bench/idle_connections.rb
#   PUMA_PORT=... (an app already running: bench/run's Puma)

require "json"
require "fileutils"
require "tmpdir"
require "etc"
require "rbconfig"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
THRUST = ENV.fetch("THRUST", File.join(ROOT, "lib", "thruster", "thrust"))
PUMA = Gem.bin_path("puma", "puma")
APP = File.join(ROOT, "bench", "app.ru")
COUNT = Integer(ENV.fetch("IDLE_CONNS", "1000"))
# Connections opened and closed before the measure (see `measure`): few, so
# that the allocator keeps little of theirs for the measured ones to reuse.
WARM_CONNS = 4
REPEAT = Integer(ENV.fetch("REPEAT", "1"))
SERVER_CPU = ENV.fetch("SERVER_CPU", "0")
ALL_PEERS = %w[thruster-rs thruster-rs-inproc nginx caddy].freeze
PEERS = ENV.fetch("PEERS", ALL_PEERS.join(",")).split(",")
MODES = ENV.fetch("MODES", "h1,tls,h2").split(",").map(&:to_sym)

abort "bench/idle_connections: #{THRUST} missing; run `bundle exec rake compile`" unless File.executable?(THRUST)

# 1,000 sockets, and the server's as many.
Process.setrlimit(:NOFILE, Process.getrlimit(:NOFILE)[1])

WORK = Dir.mktmpdir("idle-conns")
at_exit { FileUtils.rm_rf(WORK) }
CERT = File.join(WORK, "cert.pem")
KEY = File.join(WORK, "key.pem")
system("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
       "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
       "-keyout", KEY, "-out", CERT, err: File::NULL) or abort("openssl could not make a certificate")
File.binwrite(File.join(WORK, "big.bin"), "x")

def spawn_group(env, argv, name)
  log = File.join(WORK, "#{name}.log")
  Process.spawn(env, "taskset", "-c", SERVER_CPU, *argv, out: log, err: log, pgroup: true)
end

def stop(pid)
  Process.kill("TERM", -pid)
  Process.wait(pid)
rescue Errno::ESRCH, Errno::ECHILD
  nil
end

puma_port = ENV["PUMA_PORT"]&.to_i
unless puma_port
  puma_port = BenchSupport.free_port
  puma = spawn_group({ "BENCH_BIG" => File.join(WORK, "big.bin") },
                     [RbConfig.ruby, PUMA, "-e", "production", "-t", "4:4", "-q", "-b", "tcp://127.0.0.1:#{puma_port}",
                      APP], "puma")
  at_exit { stop(puma) }
  BenchSupport.wait_for(puma_port, what: "puma")
end
PUMA_PORT = puma_port

THRUST_ENV = { "TARGET_PORT" => PUMA_PORT.to_s, "LOG_REQUESTS" => "false", "H2C_ENABLED" => "true",
               "BAD_GATEWAY_PAGE" => "/nonexistent" }.freeze

# Starts a fresh server for `mode`; returns [pid, port to connect to].
def start(peer, mode)
  port = BenchSupport.free_port
  case peer
  when "thruster-rs" then [start_thrust(port, mode), port]
  when "thruster-rs-inproc" then mode == :h1 ? [start_inproc(port), port] : nil
  when "nginx" then [spawn_group({}, ["nginx", "-c", nginx_conf(port, mode), "-p", WORK], peer), port]
  when "caddy"
    home = File.join(WORK, "caddy-#{port}")
    FileUtils.mkdir_p(home)
    [spawn_group({ "XDG_DATA_HOME" => home, "XDG_CONFIG_HOME" => home, "HOME" => home },
                 ["caddy", "run", "--config", caddyfile(port, mode, home), "--adapter", "caddyfile"], peer), port]
  end
end

def start_thrust(port, mode)
  env = THRUST_ENV.merge("HTTP_PORT" => port.to_s, "STORAGE_PATH" => File.join(WORK, "storage-#{port}"))
  if mode != :h1
    env.merge!("HTTP_PORT" => BenchSupport.free_port.to_s, "HTTPS_PORT" => port.to_s,
               "TLS_CERTIFICATE_PATH" => CERT, "TLS_PRIVATE_KEY_PATH" => KEY)
  end
  spawn_group(env, [THRUST, "sleep", "86400"], "thruster-rs")
end

def start_inproc(port)
  config = File.join(WORK, "puma-#{port}.rb")
  File.write(config, <<~RUBY)
    environment "production"
    threads 4, 4
    bind "tcp://127.0.0.1:#{port}"
    plugin :thruster_rs
    thruster_rs log_requests: false, h2c_enabled: true, storage_path: #{File.join(WORK, "storage-#{port}").inspect}
  RUBY
  spawn_group({ "RUBYLIB" => File.join(ROOT, "lib"), "BENCH_BIG" => File.join(WORK, "big.bin") },
              [RbConfig.ruby, PUMA, "-q", "-C", config, APP], "thruster-rs-inproc")
end

def nginx_conf(port, mode)
  dir = File.join(WORK, "nginx-#{port}")
  FileUtils.mkdir_p(dir)
  listen = mode == :h1 ? "listen 127.0.0.1:#{port};" : "listen 127.0.0.1:#{port} ssl http2;"
  user = Process.uid.zero? ? "user #{Etc.getpwuid.name} #{Etc.getgrgid(Process.gid).name};" : ""
  File.join(dir, "nginx.conf").tap { |conf| File.write(conf, nginx_text(dir, listen, user)) }
end

def nginx_text(dir, listen, user)
  <<~NGINX
    #{user}
    worker_processes 1;
    daemon off;
    pid #{dir}/nginx.pid;
    error_log #{dir}/error.log warn;
    events { worker_connections 4096; }
    http {
      access_log off;
      keepalive_requests 1000000;
      client_body_temp_path #{dir}/body; proxy_temp_path #{dir}/proxy;
      fastcgi_temp_path #{dir}/fcgi; uwsgi_temp_path #{dir}/uwsgi; scgi_temp_path #{dir}/scgi;
      upstream puma { server 127.0.0.1:#{PUMA_PORT}; keepalive 32; }
      gzip on; gzip_comp_level 6; gzip_min_length 1024; gzip_proxied any;
      server {
        #{listen}
        ssl_certificate #{CERT}; ssl_certificate_key #{KEY};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / { proxy_pass http://puma; }
      }
    }
  NGINX
end

def caddyfile(port, mode, home)
  site = mode == :h1 ? "http://127.0.0.1:#{port}" : "https://127.0.0.1:#{port}"
  tls = mode == :h1 ? "" : "tls #{CERT} #{KEY}"
  File.join(home, "Caddyfile").tap do |file|
    File.write(file, <<~CADDY)
      {
        admin off
        auto_https off
        storage file_system #{home}
        servers {
          protocols h1 h2
        }
      }
      #{site} {
        bind 127.0.0.1
        #{tls}
        encode gzip
        reverse_proxy 127.0.0.1:#{PUMA_PORT}
      }
    CADDY
  end
end

# The server's own processes: its tree without taskset/sleep helpers (and
# without a Puma it does not own).
def tree(pid)
  BenchSupport.tree(pid).reject do |p|
    %w[sleep taskset].include?(File.read("/proc/#{p}/comm").strip)
  rescue Errno::ENOENT
    true
  end
end

def wait_up(port, mode)
  scheme = mode == :h1 ? "http" : "https"
  deadline = Time.now + 30
  until system("curl", "-sk", "-o", "/dev/null", "--max-time", "1", "#{scheme}://127.0.0.1:#{port}/hello")
    raise "nothing answers on #{port}" if Time.now > deadline

    sleep 0.1
  end
end

# KiB of RSS per idle connection in a fresh server.
def measure(peer, mode)
  pid, port = start(peer, mode)
  return nil unless pid

  wait_up(port, mode)
  # thruster-rs unmaps its code pages a second after the start
  # (sys::code_pages); a few connections of this mode after that map back
  # what a request runs, so the pages of code, the same however many
  # connections there are, do not count against the idle ones.
  sleep 1.5
  BenchSupport.idle_connections(port, WARM_CONNS, mode) { nil }
  sleep 0.5
  before = BenchSupport.rss_kib(tree(pid))
  after = nil
  BenchSupport.idle_connections(port, COUNT, mode) do
    sleep 1
    after = BenchSupport.rss_kib(tree(pid))
  end
  ((after - before).to_f / COUNT).round(2)
rescue StandardError => e
  warn "bench/idle_connections: #{peer} #{mode}: #{e.message}"
  nil
ensure
  stop(pid) if pid
end

results = Hash.new { |h, k| h[k] = {} }
REPEAT.times do
  PEERS.each do |peer|
    MODES.each do |mode|
      kib = measure(peer, mode)
      warn "bench/idle_connections: #{peer} #{mode}: #{kib.inspect} KiB per connection" if kib
      (results[peer][mode] ||= []) << kib if kib
    end
  end
end
medians = results.transform_values { |modes| modes.transform_values { |xs| xs.sort[xs.size / 2] } }
puts "KiB of RSS per idle keep-alive connection (#{COUNT} connections, fresh process, median of #{REPEAT})"
puts "| peer | #{MODES.join(' | ')} |"
puts "|---|#{'---|' * MODES.size}"
PEERS.each { |peer| puts "| #{peer} | #{MODES.map { |m| medians.dig(peer, m) || '–' }.join(' | ')} |" }
if (i = ARGV.index("--json"))
  File.write(ARGV.fetch(i + 1), JSON.generate(medians))
end
