# frozen_string_literal: true

# The Ruby API of the in-process mode: start, stop and hand over the proxy
# running on a background runtime in this process.
module Thruster
  # Environment variable carrying listening sockets across Puma's hot restart
  # (exec): "fd:addr,fd:addr".
  INHERIT_ENV = "THRUSTER_RS_INHERIT_FDS"
  # Set by `thrust` for its child: the Puma plugin then stands aside.
  WRAPPED_ENV = "THRUSTER_RS_WRAPPED"

  class << self
    # Starts the proxy in this process on a background runtime. Low level:
    # never touches Puma's binds (the plugin does that).
    #
    #   Thruster.start(upstream: "unix:/app/tmp/sockets/puma.sock", http_port: 8080)
    #
    # upstream: the app server: "unix:/path" (or "unix:///path"), "IP:PORT"
    # or "[IPv6]:PORT"; host names are not resolved.
    # bind: "IP:PORT" or an array of them; default all interfaces at http_port.
    # https_bind: the same for HTTPS in TLS mode (tls_domain:, tls_local:,
    # tls_certificate_path:); default all interfaces at https_port.
    # options: the environment settings as snake_case keywords (http_port:,
    # max_request_body:, ...). keyword > THRUSTER_X > X > default.
    # Returns the addresses listened on.
    def start(upstream:, bind: nil, https_bind: nil, **options)
      check_options!(options)
      share_sendfile_token
      addresses = Native.start(stringify(options), upstream.to_s, Array(bind).map(&:to_s),
                               Array(https_bind).map(&:to_s), take_inherited_fds)
      share_admin_endpoint
      addresses
    end

    # Stops accepting, lets in-flight requests finish for up to `timeout`
    # seconds, then closes. Other Ruby threads keep running meanwhile.
    def stop(timeout: 5)
      Native.stop(Float(timeout))
    end

    def running?
      Native.running?
    end

    # Closes the listeners now; connections finish their current request.
    # `stop` then waits for them. Quick: safe from a signal trap.
    def stop_accepting
      Native.stop_accepting
    end

    # Options for the Puma plugin, given before `plugin :thruster_rs` in
    # config/puma.rb. Same keywords as `start`, plus the plugin's own
    # (`puma_socket:`, `takeover:`, `upstream:`, `https_bind:`).
    def configure(**options)
      plugin = options.slice(*PLUGIN_OPTIONS)
      check_options!(options.except(*PLUGIN_OPTIONS))
      @plugin_options = (@plugin_options || {}).merge(plugin).merge(options.except(*PLUGIN_OPTIONS))
    end

    def plugin_options
      @plugin_options || {}
    end

    # The keywords `start` accepts, one per environment setting.
    def option_names
      @option_names ||= Native.setting_names.map { |name| name.downcase.to_sym }.freeze
    end

    # Starts handing the listening sockets to the next process image (Puma's
    # hot restart): stops accepting (new connections wait in the kernel
    # backlog, not refused) while in-flight requests finish; the sockets
    # survive exec. Returns "fd:addr" strings: keep those fds open across
    # exec and pass the list in ENV[INHERIT_ENV] (see `export_handoff`);
    # call `stop` right before exec.
    def begin_handoff
      # The admin listener's URL and token go with its socket, so the next
      # image listens where the app's Thruster.purge already calls.
      @handoff_env = ENV.to_h.slice(ADMIN_URL_ENV, ADMIN_TOKEN_ENV)
      Native.handoff_begin
    end

    # Puts handed-over sockets where `start` in the next process image finds
    # them; returns their fds.
    def export_handoff(pairs)
      ENV.update(@handoff_env || {}) unless pairs.empty?
      ENV[INHERIT_ENV] = pairs.join(",") unless pairs.empty?
      pairs.map { |pair| Integer(pair.split(":", 2).first) }
    end

    private

    PLUGIN_OPTIONS = %i[puma_socket takeover upstream https_bind].freeze

    def check_options!(options)
      unknown = options.keys.map(&:to_sym) - option_names
      return if unknown.empty?

      raise ConfigError, "unknown option#{'s' if unknown.size > 1} #{unknown.map(&:inspect).join(', ')}; " \
                         "accepted: #{option_names.join(', ')}"
    end

    # The proxy sends this token upstream; Puma's workers, forked later,
    # inherit it and the Thruster::Sendfile middleware checks it. Kept across
    # a hot restart (exec) so old and new processes agree.
    def share_sendfile_token
      require "securerandom"
      require_relative "sendfile"
      return unless ENV.fetch(SENDFILE_TOKEN_ENV, "").empty?

      ENV[SENDFILE_TOKEN_ENV] = SecureRandom.hex(32)
    end

    # Where Thruster.purge finds the admin listener: set in the master before
    # Puma forks its workers, so they inherit it (and, across a hot restart,
    # the next image keeps the same port and token).
    def share_admin_endpoint
      url, token = Native.admin_endpoint
      return unless url

      ENV[ADMIN_URL_ENV] = url
      ENV[ADMIN_TOKEN_ENV] = token
    end

    def stringify(options)
      options.to_h { |key, value| [key.to_s, value.nil? ? "" : value.to_s] }
    end

    # Listening sockets a previous process image handed over (see
    # begin_handoff and export_handoff); consumed once.
    def take_inherited_fds
      value = ENV.delete(INHERIT_ENV).to_s
      value.split(",").filter_map { |pair| Integer(pair.split(":", 2).first, exception: false) }
    end
  end
end
