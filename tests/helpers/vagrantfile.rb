# Evaluate a Vagrantfile without Vagrant: every call on the config object is
# recorded under its dotted path, and the record is printed as JSON.
#   ruby tests/helpers/vagrantfile.rb Vagrantfile
require "json"

class Recorder
  def initialize(path, log)
    @path = path
    @log = log
  end

  def method_missing(name, *args, **kw, &blk)
    name = name.to_s
    if name.end_with?("=")
      @log[(@path + [name.chomp("=")]).join(".")] = args[0]
      return args[0]
    end
    unless args.empty? && kw.empty? && blk.nil?  # `config.vm` is only a step
      (@log[(@path + [name]).join(".") + "()"] ||= []) << { "args" => args, "options" => kw }
    end
    inner = Recorder.new(@path + [name] + args.first(1).map(&:to_s), @log)
    blk&.call(inner)
    inner
  end

  def respond_to_missing?(*)
    true
  end
end

LOG = {}

module Vagrant
  def self.configure(version)
    LOG["version"] = version
    yield Recorder.new([], LOG)
  end
end

load ARGV.fetch(0)
puts JSON.generate(LOG)
