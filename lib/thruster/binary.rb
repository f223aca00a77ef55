# frozen_string_literal: true

module Thruster
  # Finds the compiled `thrust` wrapper binary: next to this file after
  # `rake compile` or in an installed gem, else in the gem's extension dir.
  module Binary
    NAME = "thrust"

    def self.path
      candidates.find { |candidate| File.file?(candidate) && File.executable?(candidate) }
    end

    # The file `thrust` loads into the app it starts, through RUBYOPT, so the
    # X-Sendfile Railtie is installed even when the Gemfile says `gem
    # "thruster-rs", require: false` (Rails 8's line for basecamp's gem). It
    # loads nothing else; it waits for the app's Rails::Application subclass
    # (railtie_hook.rb).
    RAILTIE_HOOK = File.expand_path("railtie_hook.rb", __dir__)

    # RUBYOPT for the app: `current` plus `-r<hook>`, when `thrust` runs in a
    # Rails app's root (where `bin/rails server` and Rails' Dockerfile run
    # it); other apps' Ruby processes are left alone. Ruby splits RUBYOPT at
    # whitespace and knows no quoting, so a hook path with a space cannot go
    # there: `current` is returned unchanged and a warning says what to put
    # in the Gemfile instead.
    def self.app_rubyopt(current, hook: RAILTIE_HOOK, rails_app: File.file?("config/application.rb"), io: $stderr)
      flag = "-r#{hook}"
      return current if !rails_app || current.to_s.split.include?(flag)

      if hook.match?(/\s/)
        io.puts "thrust: cannot load the X-Sendfile Railtie into the app (the gem's path #{hook.inspect} " \
                "has a space); X-Sendfile stays off unless the Gemfile says " \
                '`gem "thruster-rs", require: "thruster/railtie"`'
        return current
      end
      [current, flag].reject { |part| part.to_s.strip.empty? }.join(" ")
    end

    def self.candidates
      list = [File.expand_path(NAME, __dir__)]
      spec = Gem.loaded_specs["thruster-rs"]
      list << File.join(spec.extension_dir, "thruster", NAME) if spec.respond_to?(:extension_dir)
      list
    end
  end
end
