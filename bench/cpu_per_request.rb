#!/usr/bin/env ruby
# frozen_string_literal: true

# CPU time per request of the proxy process alone (utime + stime from
# /proc/<pid>/stat, Puma excluded), for `thrust` binaries side by side:
# far less noisy than requests/s on a 2-CPU machine. Each binary runs in
# front of its own Puma with the benchmark app; the workloads are wrk runs
# of /hello (uncached, 13 B) and the cached 100 KB asset (gzip), repeated
# REPEAT times with the binaries interleaved.
#
#   bench/cpu_per_request.rb NAME=path/to/thrust[:VAR=VALUE,...] [NAME=... ...]
#   REPEAT=5 DURATION=8 CONNS=64 bench/cpu_per_request.rb before=/tmp/thrust-old after=lib/thruster/thrust
#   WORKLOADS=hello,page-browser bench/cpu_per_request.rb nginx thrust=lib/thruster/thrust inproc
#
# `nginx` (no path) is nginx 1 worker with `gzip on` level 6 in front of its
# own Puma, the reference of the uncached targets (its master and worker
# counted). `inproc` is Puma with the plugin (this checkout's extension),
# measured by the CPU of the proxy's threads in Puma's process. WORKLOADS
# picks among: hello, hello-close (a connection per request), css (the
# cached 100 KB asset, gzip), page (the private 20 KB page, gzip; page-br,
# page-zstd: in those codings), page-browser (the same with the
# `Accept-Encoding` of a current browser). Requests/s and the page's bytes
# on the wire are printed too.
#   bench/cpu_per_request.rb off=lib/thruster/thrust on=lib/thruster/thrust:METRICS_PORT=free
#
# Settings after a `:` go to that binary only (`free` = a free port), so one
# binary can be compared with itself under two configurations.
#
# Prints microseconds of proxy CPU per request (median, min–max) per binary
# and workload, and the ratio of each to the first binary.

require "open3"
require "fileutils"
require "tmpdir"
require "etc"
require_relative "support"

REPEAT = Integer(ENV.fetch("REPEAT", "5"))
DURATION = Integer(ENV.fetch("DURATION", "8"))
CONNS = Integer(ENV.fetch("CONNS", "64"))
SERVER_CPU = ENV.fetch("SERVER_CPU", "0")
CLIENT_CPU = ENV.fetch("CLIENT_CPU", "1")
PUMA = Gem.bin_path("puma", "puma")
APP = File.expand_path("app.ru", __dir__)
ROOT = File.expand_path("..", __dir__)

binaries = ARGV.map do |arg|
  next ["nginx", "nginx", {}] if arg == "nginx"
  next ["inproc", "inproc", {}] if arg == "inproc"

  name, spec = arg.split("=", 2)
  path, settings = spec.to_s.split(":", 2)
  [name, path.to_s.empty? ? nil : path, settings.to_s.split(",").to_h { |kv| kv.split("=", 2) }]
end
if binaries.empty? || binaries.any? { |_, p, _| p.nil? }
  abort "usage: #{$PROGRAM_NAME} NAME=path/to/thrust[:VAR=VALUE,...] ..."
end
binaries.each do |name, path, _|
  abort "#{name}: #{path} is not executable" unless %w[nginx inproc].include?(name) || File.executable?(path)
end

ALL_WORKLOADS = {
  "hello" => ["/hello", []],
  # A new connection for every request (wrk reconnects after each answer).
  "hello-close" => ["/hello", ["-H", "Connection: close"]],
  "css" => ["/assets/app.css", ["-H", "Accept-Encoding: gzip"]],
  "page" => ["/page", ["-H", "Accept-Encoding: gzip"]],
  "page-br" => ["/page", ["-H", "Accept-Encoding: br"]],
  "page-zstd" => ["/page", ["-H", "Accept-Encoding: zstd"]],
  "page-browser" => ["/page", ["-H", "Accept-Encoding: gzip, deflate, br, zstd"]]
}.freeze
WORKLOADS = ALL_WORKLOADS.slice(*ENV.fetch("WORKLOADS", "hello,css").split(",")).freeze
abort "WORKLOADS: pick among #{ALL_WORKLOADS.keys.join(', ')}" if WORKLOADS.empty?

def nginx_conf(dir, port, target)
  <<~NGINX
    #{Process.uid.zero? ? "user #{Etc.getpwuid.name} #{Etc.getgrgid(Process.gid).name};" : ''}
    worker_processes 1;
    daemon off;
    pid #{dir}/nginx/nginx.pid;
    error_log #{dir}/nginx/error.log warn;
    events { worker_connections 4096; }
    http {
      include /etc/nginx/mime.types;
      access_log off;
      keepalive_requests 1000000;
      client_body_temp_path #{dir}/nginx/body; proxy_temp_path #{dir}/nginx/proxy;
      fastcgi_temp_path #{dir}/nginx/fcgi; uwsgi_temp_path #{dir}/nginx/uwsgi; scgi_temp_path #{dir}/nginx/scgi;
      upstream puma { server 127.0.0.1:#{target}; keepalive 32; }
      gzip on; gzip_comp_level 6; gzip_min_length 1024; gzip_proxied any; gzip_vary on;
      gzip_types text/plain text/css application/javascript application/json image/svg+xml;
      server {
        listen 127.0.0.1:#{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        location / { proxy_pass http://puma; }
      }
    }
  NGINX
end

# nginx in front of a Puma of its own; returns [pids to measure, port, pgid].
def start_nginx(dir)
  port = BenchSupport.free_port
  target = BenchSupport.free_port
  puma = Process.spawn({ "BENCH_BIG" => File.join(dir, "big.bin") }, "taskset", "-c", SERVER_CPU, RbConfig.ruby,
                       PUMA, "-t", "8:8", "-q", "-b", "tcp://127.0.0.1:#{target}", APP,
                       out: File.join(dir, "nginx-puma.log"), err: File.join(dir, "nginx-puma.log"), pgroup: true)
  BenchSupport.wait_for(target, what: "puma")
  FileUtils.mkdir_p(File.join(dir, "nginx"))
  conf = File.join(dir, "nginx.conf")
  File.write(conf, nginx_conf(dir, port, target))
  pid = Process.spawn("taskset", "-c", SERVER_CPU, "nginx", "-c", conf, "-p", dir,
                      out: File.join(dir, "nginx.log"), err: File.join(dir, "nginx.log"), pgroup: true)
  BenchSupport.wait_for(port, what: "nginx")
  [pid, port, [pid, puma]]
end

# Puma (single mode, same threads) with the proxy in-process, from this
# checkout's extension (`bundle exec rake compile`); the plugin caps the
# requests to Puma at its 8 threads by itself.
def start_inproc(dir)
  port = BenchSupport.free_port
  conf = File.join(dir, "inproc-puma.rb")
  File.write(conf, <<~RUBY)
    threads 8, 8
    bind "tcp://127.0.0.1:#{port}"
    plugin :thruster_rs
    thruster_rs log_requests: false, storage_path: #{File.join(dir, "storage-inproc-#{port}").inspect}
  RUBY
  log = File.join(dir, "inproc.log")
  env = { "BENCH_BIG" => File.join(dir, "big.bin"), "RUBYLIB" => File.join(ROOT, "lib"),
          "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil }
  pid = Process.spawn(env, "taskset", "-c", SERVER_CPU, RbConfig.ruby, PUMA, "-q", "-C", conf, APP,
                      out: log, err: log, pgroup: true)
  BenchSupport.wait_for(port, what: "inproc")
  [pid, port, [pid]]
end

def start(name, path, settings, dir)
  return start_nginx(dir) if name == "nginx"
  return start_inproc(dir) if name == "inproc"

  port = BenchSupport.free_port
  target = BenchSupport.free_port
  env = { "HTTP_PORT" => port.to_s, "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false",
          "BENCH_BIG" => File.join(dir, "big.bin"), "PUMA_MAX_THREADS" => "8",
          # Puma's 8 threads, as a deploy sets it (binaries before it ignore it).
          "UPSTREAM_MAX_CONNECTIONS" => "8",
          # A disk cache of its own per run: none starts warm from another.
          "STORAGE_PATH" => File.join(dir, "storage-#{name}-#{port}") }
  settings.each { |var, value| env[var] = value == "free" ? BenchSupport.free_port.to_s : value }
  log = File.join(dir, "#{name}.log")
  pid = Process.spawn(env, "taskset", "-c", SERVER_CPU, path, RbConfig.ruby, PUMA, "-t", "8:8", "-q",
                      "-b", "tcp://127.0.0.1:#{target}", APP,
                      out: log, err: log, pgroup: true)
  BenchSupport.wait_for(port, what: name)
  [pid, port, [pid]]
end

# The server's own processes: for nginx its master and workers (the tree
# without taskset), for thrust the thrust process alone (Puma is its child).
def measured_pids(name, pid)
  return [pid] unless name == "nginx"

  BenchSupport.tree(pid).select { |p| File.read("/proc/#{p}/comm").strip == "nginx" rescue false } # rubocop:disable Style/RescueModifier
end

# CPU seconds of the proxy: its processes; in-process, the Puma process's
# threads the proxy runs on (named thruster-*), Puma's own excluded.
def proxy_cpu_seconds(name, pids)
  return BenchSupport.cpu_seconds(pids) unless name == "inproc"

  BenchSupport.thread_cpu_seconds(pids.first, "thruster-")
end

# Requests completed, proxy CPU seconds, req/s and p99 (ms) over one wrk run.
def measure(name, pids, port, (path, header))
  before = proxy_cpu_seconds(name, pids)
  out, = Open3.capture2e("taskset", "-c", CLIENT_CPU, "wrk", "-t2", "-c#{CONNS}", "-d#{DURATION}s", "--latency",
                         *header, "http://127.0.0.1:#{port}#{path}")
  cpu = proxy_cpu_seconds(name, pids) - before
  requests = out[/(\d+) requests in/, 1].to_i
  abort "wrk failed:\n#{out}" if requests.zero? || out.include?("Non-2xx")
  [requests, cpu, out[%r{Requests/sec:\s+([\d.]+)}, 1].to_f, ms(out[/^\s+99%\s+(\S+)/, 1].to_s)]
end

# wrk's latency text ("812.00us", "1.20ms", "1.05s") in milliseconds.
def ms(text)
  return text.to_f / 1000 if text.end_with?("us")
  return text.to_f if text.end_with?("ms")

  text.to_f * 1000
end

# Bytes on the wire (body) and Content-Encoding of one response.
def wire(port, (path, header))
  format = "SIZE %{size_download}" # rubocop:disable Style/FormatStringToken -- curl's, not Ruby's
  out, = Open3.capture2("curl", "-s", "-o", "/dev/null", "-D", "-", "-w", format, *header,
                        "http://127.0.0.1:#{port}#{path}")
  "#{out[/SIZE (\d+)/, 1]} B #{out[/^content-encoding: *(\S+)/i, 1] || 'identity'}"
end

def median(values) = values.sort[values.size / 2]

# One line per workload and binary; ratios against the first binary.
def report(binaries, samples, wires)
  WORKLOADS.each_key do |workload|
    base = median(samples[[workload, binaries.first[0]]])
    base_rps = median(samples[[workload, binaries.first[0], :rps]])
    binaries.each do |name, _|
      xs = samples[[workload, name]]
      puts "#{workload.ljust(16)} #{name.ljust(10)} #{median(xs).round(1)} µs/req " \
           "(#{xs.min.round(1)}–#{xs.max.round(1)}) #{(median(xs) / base).round(3)}× | " \
           "#{throughput(samples, workload, name, base_rps)} | #{wires[[workload, name]]}"
    end
  end
end

def throughput(samples, workload, name, base_rps)
  rps = median(samples[[workload, name, :rps]])
  "#{rps.round} req/s #{(rps / base_rps).round(2)}× | p99 #{median(samples[[workload, name, :p99]]).round(2)} ms"
end

Dir.mktmpdir("cpu-per-request") do |dir|
  File.binwrite(File.join(dir, "big.bin"), "x")
  servers = binaries.to_h { |name, path, settings| [name, start(name, path, settings, dir)] }
  # Warm the cache and the upstream pool before measuring.
  wires = {}
  servers.each do |name, (_, port)|
    WORKLOADS.each do |workload, spec|
      Net::HTTP.get(URI("http://127.0.0.1:#{port}#{spec[0]}"))
      wires[[workload, name]] = wire(port, spec)
    end
  end
  samples = Hash.new { |h, k| h[k] = [] }
  REPEAT.times do |rep|
    WORKLOADS.each do |workload, spec|
      servers.each do |name, (pid, port)|
        requests, cpu, rps, p99 = measure(name, measured_pids(name, pid), port, spec)
        samples[[workload, name]] << (cpu * 1e6 / requests)
        samples[[workload, name, :rps]] << rps
        samples[[workload, name, :p99]] << p99
        warn "rep #{rep + 1} #{workload.ljust(16)} #{name.ljust(10)} #{requests} req, #{cpu.round(2)} CPU s, " \
             "#{(cpu * 1e6 / requests).round(1)} µs/req, #{rps.round} req/s, p99 #{p99.round(2)} ms"
      end
    end
  end
  report(binaries, samples, wires)
ensure
  servers&.each_value { |_, _, groups| groups.each { |g| Process.kill("TERM", -g) rescue nil } } # rubocop:disable Style/RescueModifier
end
