# frozen_string_literal: true

require "json"
require "tmpdir"
require "fileutils"

# A process started for a test in its own process group, with its output
# collected in the background. Every one is killed after each example.
class ChildProcess
  attr_reader :pid, :storage_path

  @all = []
  class << self
    attr_reader :all

    # Unless `env` names a STORAGE_PATH (a test that shares one on
    # purpose), the process gets a fresh one, removed after the example: the
    # disk cache tier lives under it and is on by default, so proxies of
    # different tests must never see each other's entries.
    def start(env, *argv, stdin: :close, chdir: Dir.pwd)
      storage = nil
      unless env.key?("STORAGE_PATH") || env.key?("THRUSTER_STORAGE_PATH")
        storage = Dir.mktmpdir("thruster-storage")
        env = env.merge("STORAGE_PATH" => storage, "THRUSTER_STORAGE_PATH" => nil)
      end
      new(env, argv, stdin:, chdir:, storage:).tap { |child| all << child }
    end

    def reap_all
      all.each(&:kill_group)
      all.each(&:remove_storage)
      all.clear
    end
  end

  def initialize(env, argv, stdin:, chdir:, storage: nil)
    @storage_path = storage
    @output = +""
    @mutex = Mutex.new
    out_r, out_w = IO.pipe
    err_r, err_w = IO.pipe
    in_opt = stdin == :close ? :close : stdin
    @pid = Process.spawn(env, *argv, out: out_w, err: err_w, in: in_opt, pgroup: true, chdir:)
    out_w.close
    err_w.close
    @readers = [out_r, err_r].map { |io| Thread.new { pump(io) } }
    @status = nil
  end

  def output
    @mutex.synchronize { @output.dup }
  end

  # JSON log lines the proxy wrote (the child's own lines are skipped).
  def log_lines
    output.lines.filter_map do |line|
      JSON.parse(line) if line.start_with?("{")
    rescue JSON::ParserError
      nil
    end
  end

  def wait_for_output(pattern, timeout: 15)
    deadline = monotonic + timeout
    until (match = output.match(pattern))
      raise "timed out waiting for #{pattern.inspect}; output so far:\n#{output}" if monotonic > deadline
      raise "process exited (#{@status.inspect}) before #{pattern.inspect}:\n#{output}" if exited?

      sleep 0.02
    end
    match
  end

  # The real port from the "Server started" log line (HTTP_PORT=0).
  def http_port
    wait_for_output(/"msg":"Server started","http":":(\d+)"/)[1].to_i
  end

  # The real HTTPS port from the "Server started" log line (TLS mode).
  def https_port
    wait_for_output(/"msg":"Server started".*"https":":(\d+)"/)[1].to_i
  end

  def signal(name)
    Process.kill(name, @pid)
  end

  def exited?
    return true if @status

    _, status = Process.waitpid2(@pid, Process::WNOHANG)
    @status = status if status
    !@status.nil?
  end

  # Waits for exit and returns the Process::Status.
  def wait(timeout: 20)
    deadline = monotonic + timeout
    until exited?
      raise "pid #{@pid} still running after #{timeout}s; output:\n#{output}" if monotonic > deadline

      sleep 0.02
    end
    @readers.each { |t| t.join(2) }
    @status
  end

  def remove_storage
    FileUtils.rm_rf(@storage_path) if @storage_path
  end

  def kill_group
    Process.kill("KILL", -@pid) unless exited?
  rescue Errno::ESRCH, Errno::EPERM
    nil
  ensure
    begin
      Process.waitpid(@pid) unless @status
    rescue Errno::ECHILD
      nil
    end
  end

  private

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def pump(io)
    while (chunk = io.readpartial(4096))
      @mutex.synchronize { @output << chunk }
    end
  rescue IOError
    nil
  end
end
